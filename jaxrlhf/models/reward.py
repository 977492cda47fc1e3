"""Reward models as functions of their parameters: the scalar score head read at the last
real token of each sequence, one model or a stacked ensemble of M members.

    h, r = last_hidden_and_rewards(params, graphdef, tokens, mask)   # [..., D], [...]
    r    = sequence_rewards(params, graphdef, tokens, mask)          # [...]
    r_M  = member_rewards(stacked_params, graphdef, tokens, mask)    # [M, ...]

An ensemble is M models of one architecture whose parameters are stacked on a leading
member axis (`stack_trees`); `load_ensemble` stacks the members exported by an `rm_ensemble`
stage directory (its ensemble.json, else member_<m>/hf).
"""
from __future__ import annotations

import glob
import json
import os
from typing import List, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

ENSEMBLE_FILE = "ensemble.json"


def last_hidden_and_rewards(params, graphdef, tokens, mask):
    """Final hidden state at the last real token [..., D] and the reward [...] of [..., T]
    sequences (any leading shape): the score head applied to that hidden state."""
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    model = nnx.merge(graphdef, params)
    h_last = model.last_hidden(tokens.reshape(-1, t), mask.reshape(-1, t))
    r = model.apply_head(h_last[:, None])[:, 0]
    return h_last.reshape(lead + h_last.shape[-1:]), r.reshape(lead)


def sequence_rewards(params, graphdef, tokens, mask):
    """Rewards of [..., T] sequences (any leading shape): score at the last real token."""
    return last_hidden_and_rewards(params, graphdef, tokens, mask)[1]


def member_rewards(stacked_params, graphdef, tokens, mask):
    """Rewards [M, ...] of [..., T] sequences under every member of a stacked ensemble."""
    return jax.vmap(lambda p: sequence_rewards(p, graphdef, tokens, mask))(stacked_params)


# ------------------------------------------------------------------------------------------
# Stacked ensembles.

def stack_trees(trees: Sequence):
    """[tree_0, ..., tree_{M-1}] -> one tree with a leading member axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, m: int):
    """Member m of a stacked tree."""
    return jax.tree.map(lambda x: x[m], tree)


def stacked_shardings(shardings, mesh):
    """The sharding of each leaf with a replicated member axis in front."""
    return jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), shardings)


def member_dirs(path: str) -> List[str]:
    """The members' HF directories of an rm_ensemble stage dir, in member order."""
    from jaxrlhf.paths import local_copy
    path = local_copy(path)   # a gs:// stage directory is downloaded once
    meta = os.path.join(path, ENSEMBLE_FILE)
    if os.path.exists(meta):
        with open(meta) as f:
            dirs = [os.path.join(path, d) for d in json.load(f)["member_dirs"]]
    else:
        dirs = sorted(glob.glob(os.path.join(path, "member_*", "hf")),
                      key=lambda d: int(d.split("member_")[-1].split(os.sep)[0]))
    if not dirs:
        raise FileNotFoundError(f"{path} is not an rm_ensemble stage directory (no "
                                f"{ENSEMBLE_FILE} and no member_<m>/hf exports).")
    return dirs


def load_ensemble(path: str, mesh=None):
    """(graphdef, stacked params [M, ...], member 0's model) of an rm_ensemble stage dir."""
    from jaxrlhf import sharding as shd
    from jaxrlhf.models.hf_io import load_hf
    models = [load_hf(d, head="score", mesh=mesh) for d in member_dirs(path)]
    if len({m.cfg for m in models}) != 1:
        raise ValueError(f"The members of {path} have different model configs.")
    params = [nnx.to_pure_dict(nnx.state(m)) for m in models]
    if mesh is not None:
        sh = nnx.to_pure_dict(shd.state_shardings(nnx.state(models[0]), mesh))
        stacked = jax.jit(stack_trees, out_shardings=stacked_shardings(sh, mesh))(params)
    else:
        stacked = stack_trees(params)
    return nnx.graphdef(models[0]), stacked, models[0]
