"""The order of a GradNorm step in MultiTaskUpdate.step (Chen et al., ICML 2018; LibMTL
LibMTL/weighting/GradNorm.py; the TAG code): the step's loss uses the weights w(t) it starts with; the
GradNorm update, computed from the gradient norms at w(t) on the same batch, gives w(t+1), which applies
from the next step."""
import torch

from common.multitask import add_update_args, make_update
from common.arguments import build_parser
from common.train import Run


def test_gradnorm_step_trains_with_w_t_and_updates_to_w_t_plus_1(tiny_data, tmp_path):
    args = add_update_args(build_parser()).parse_args(
        ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
         "--weighting", "gradnorm", "--gradnorm-lr", "0.1", "--epochs", "1", "--quiet"])
    run = Run(args, strategy="gradnorm_order_probe")
    update = make_update(run, args)
    run.start(update=update)
    gn = update.weighting
    updates, terms_used = [], []
    original_update, original_terms = gn.update, gn.terms

    def recording_update(losses, grad_norms, active=None):
        before = gn.weights()
        out = original_update(losses, grad_norms, active)
        updates.append((losses.detach().clone(), before, gn.weights()))
        return out

    def recording_terms(losses, active=None):
        terms = original_terms(losses, active)
        terms_used.append((losses.detach().clone(), terms.detach().clone()))
        return terms

    gn.update, gn.terms = recording_update, recording_terms
    for step, batch in enumerate(run.batches()):
        update.step(batch)
        if step == 2:
            break
    assert len(updates) == len(terms_used) == 3
    for (l_update, w_t, w_next), (l_terms, terms) in zip(updates, terms_used):
        assert torch.equal(l_update, l_terms)                 # the update saw this step's batch
        assert not torch.allclose(w_t, w_next, atol=1e-4)     # the weights did move on this step
        assert torch.allclose(terms, w_t.to(terms) * l_terms, rtol=1e-6, atol=1e-7)       # loss of w(t)
        assert not torch.allclose(terms, w_next.to(terms) * l_terms, rtol=1e-4, atol=1e-6)
    for (_, _, w_next), (_, w_t, _) in zip(updates, updates[1:]):
        assert torch.equal(w_next, w_t)                        # w(t+1) applies from the next step
