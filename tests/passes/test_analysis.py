"""Analysis passes on a graph whose structure is known by construction."""

import pytest
import torch

from clq_compile.annotations import annotated_linears, linear_info
from clq_compile.api import capture_calls
from clq_compile.build import analyze
from clq_compile.passes.groups import groups
from clq_compile.passes.roles import roles
from clq_compile.recipes import resolve_recipe
from clq_compile.spec import QuantSpec
from tests.passes.toy import ToyDiT, toy_inputs


@pytest.fixture(scope="module")
def toy_gm():
    torch.manual_seed(0)
    model = ToyDiT(depth=3).eval()
    gm = capture_calls(model, [toy_inputs()])[0][0].gm
    return analyze(gm, QuantSpec(4, 4), resolve_recipe("rtn", window=1))


def infos(gm):
    return {linear_info(n).name: linear_info(n) for n in annotated_linears(gm)}


def test_roles_from_structure(toy_gm):
    r = roles(toy_gm)
    assert r["embed"] == "embed" and r["t_embed"] == "embed"
    assert r["proj_out"] == "final"
    for b in range(3):
        p = f"blocks.{b}"
        assert r[f"{p}.mod"] == "modulation"
        assert (r[f"{p}.attn.to_q"], r[f"{p}.attn.to_k"], r[f"{p}.attn.to_v"]) == (
            "attn_q", "attn_k", "attn_v")
        assert (r[f"{p}.cross.to_q"], r[f"{p}.cross.to_k"], r[f"{p}.cross.to_v"]) == (
            "cross_q", "cross_k", "cross_v")
        assert r[f"{p}.attn.to_out"] == r[f"{p}.cross.to_out"] == "attn_out"
        assert (r[f"{p}.up"], r[f"{p}.down"]) == ("mlp_up", "mlp_down")


def test_blocks_in_execution_order(toy_gm):
    i = infos(toy_gm)
    assert [i[f"blocks.{b}.attn.to_q"].block for b in range(3)] == [0, 1, 2]
    assert i["embed"].block is None and i["proj_out"].block is None


def test_shared_input_groups(toy_gm):
    i = infos(toy_gm)
    g = groups(toy_gm)
    qkv = {f"blocks.0.attn.to_{c}" for c in "qkv"}
    assert set(g[i["blocks.0.attn.to_q"].group]) == qkv
    # cross-attention k/v read the context, shared by every block: one group across blocks
    assert {f"blocks.{b}.cross.to_k" for b in range(3)} <= set(g[i["blocks.0.cross.to_k"].group])
    assert i["blocks.0.cross.to_q"].group != i["blocks.0.cross.to_k"].group
    assert i["blocks.0.up"].group != i["blocks.0.down"].group


def test_skip_policy_records_reasons(toy_gm):
    i = infos(toy_gm)
    for name in ("embed", "t_embed", "proj_out", "blocks.1.mod"):
        assert i[name].skip_reason, name
    assert not i["blocks.1.attn.to_q"].skip_reason


def test_chain_is_downstream_within_window_in_order(toy_gm):
    i = infos(toy_gm)
    chain = i["blocks.0.attn.to_v"].chain
    assert chain[0] == "blocks.0.attn.to_out"
    assert "blocks.1.down" in chain and not any(c.startswith("blocks.2.") for c in chain)
    assert "blocks.0.attn.to_q" not in chain  # not downstream
    assert "blocks.1.mod" not in chain  # skipped layers are not targets
    pos = {n: k for k, n in enumerate(i)}
    assert [pos[c] for c in chain] == sorted(pos[c] for c in chain)
    assert i["blocks.2.down"].chain == []


def test_group_size_not_dividing_k_is_a_recorded_skip():
    model = ToyDiT(depth=1).eval()
    gm = capture_calls(model, [toy_inputs()])[0][0].gm
    gm = analyze(gm, QuantSpec(4, 4, w_group=48), resolve_recipe("rtn"))
    i = infos(gm)
    assert "not divisible by the weight group size 48" in i["blocks.0.attn.to_q"].skip_reason
