"""The do-nothing state that every rule and objective starts from (weightings, aggregators, gradient rules,
the fine-tuning objective): no trainable parameters and nothing to checkpoint. A class that has either
overrides these; Run trains and checkpoints them all alike (run.add_parameters, run.start(**stateful))."""


class Stateless:
    def parameters(self):
        return []

    def to(self, device):
        return self

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
