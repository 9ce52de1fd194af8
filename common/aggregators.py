"""Placeholder until the full set lands: PCGrad only."""
from common import gradagg


def _pcgrad(G, ctx):
    return gradagg.pcgrad_coefficients(G, gradagg.pcgrad_order(G.shape[0], ctx["generator"]))


AGGREGATORS = {"pcgrad": _pcgrad}
