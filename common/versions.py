"""Versions of the protocol and of every rule, stored in each run's summary.json, so that a committed run
record is reused only while the code that made it still gives the same numbers (issue 25).

    PROTOCOL_VERSION          the shared code: data, model, training loop, evaluation, compare's protocol
    RULE_VERSION = n          at the top of a strategy script: its own schedule
    cls.version               a weighting, aggregator or scheduler class (common/weighting.py, ...)

Bump the number of what you changed whenever a change alters any number a run produces; a pure
refactor keeps them. tests/test_golden.py pins a few steps of every strategy on tiny data: if it fails,
either the change was meant to alter results (bump the version, then refresh the pins with
UPDATE_GOLDEN=1) or it was not (fix the change). make compare reruns every record whose versions differ
from the current ones (stale_reason) and never mixes them into a table.
"""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# 1: issue 25's protocol (val 864 / test 3200 synthetic clips, budget counts every optimizer step,
#    per-clip test scores recorded)
PROTOCOL_VERSION = 1

_RULE_VERSION_LINE = re.compile(r"^RULE_VERSION\s*=\s*(\d+)\s*(#.*)?$", re.M)


def script_version(script):
    """RULE_VERSION of strategies/<script>.py (read from its source, so nothing is imported), or None."""
    path = REPO / "strategies" / f"{script}.py"
    if not path.exists():
        return None
    match = _RULE_VERSION_LINE.search(path.read_text())
    return int(match.group(1)) if match else None


def script_constant(script, name):
    """The literal value of a top-level `NAME = ...` of strategies/<script>.py (read from its source, so that
    nothing is imported: e.g. TUNE_GRID, the flag a script tunes with --grid full), or None."""
    path = REPO / "strategies" / f"{script}.py"
    if not path.exists():
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def rule_key(kind, name):
    return f"{kind}:{name}"


def rule_versions_of(objects):
    """{kind:name: version} of the rules among a run's stateful objects: anything with rule_versions()
    (MultiTaskUpdate: its weighting and aggregator), or with kind, name and version (a rule class)."""
    out = {}
    for obj in objects:
        if hasattr(obj, "rule_versions"):
            out.update(obj.rule_versions())
        elif all(hasattr(obj, a) for a in ("rule_kind", "name", "version")):
            out[rule_key(obj.rule_kind, obj.name)] = obj.version
    return out


def current_rule_version(key):
    """The version the code has now of a rule key ("weighting:dwa", "aggregator:pcgrad", "scheduler:...")."""
    from common.aggregators import AGGREGATORS
    from common.gradient_rules import GRADIENT_RULES
    from common.schedulers import SCHEDULERS
    from common.weighting import WEIGHTINGS
    kind, _, name = key.partition(":")
    from common.pretrain import PretrainObjective
    registry = {"weighting": WEIGHTINGS, "aggregator": {**AGGREGATORS, **GRADIENT_RULES},
                "scheduler": SCHEDULERS, "objective": {"pretrain": PretrainObjective}}.get(kind, {})
    cls = registry.get(name)
    return getattr(cls, "version", None) if cls is not None else None


def run_versions(script, rules):
    """What a run records: the protocol, its script's RULE_VERSION and the versions of the rules it used."""
    return {"protocol": PROTOCOL_VERSION, "script": script, "script_version": script_version(script),
            "rules": dict(sorted(rules.items()))}


def stale_reason(recorded):
    """None when a record's versions equal the current code's, else why it is stale (a short text)."""
    if not recorded:
        return "the record has no versions (made before issue 25)"
    if recorded.get("protocol") != PROTOCOL_VERSION:
        return f"protocol {recorded.get('protocol')} -> {PROTOCOL_VERSION}"
    now = script_version(recorded.get("script"))
    if recorded.get("script_version") != now:
        return f"strategies/{recorded.get('script')}.py RULE_VERSION {recorded.get('script_version')} -> {now}"
    for key, version in recorded.get("rules", {}).items():
        now = current_rule_version(key)
        if version != now:
            return f"{key} version {version} -> {now}"
    return None


def data_fingerprint(datasets):
    """A short hash of the splits' labels and text lengths (dataset order): records made on other data
    (another size, seed or source) are never taken for this data's."""
    import hashlib

    import numpy as np
    h = hashlib.sha1()
    for ds in datasets:
        h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(ds.text_lengths(), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def record_stale(summary_path, fingerprint=None):
    """None when the finished run at summary_path may be reused with the current code (and, given a
    fingerprint, on the current data); else why not."""
    import json
    path = Path(summary_path)
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        return f"no {path}"
    summary = json.loads(path.read_text())
    if fingerprint is not None and summary.get("data_fingerprint") != fingerprint:
        return f"made on other data (fingerprint {summary.get('data_fingerprint')}, now {fingerprint})"
    return stale_reason(summary.get("versions"))


def repo_relative(path):
    """A path inside the repository as a relative string (records stay valid in any clone); others as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)

