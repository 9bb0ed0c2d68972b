"""Options and objects that used to do something other than asked without a word: a
``lowrank`` branch clamped to the whole weight, DSQ's warning blaming the graph, a
recording that kept a failed call or could not be entered twice, a quantized model moved
to the meta device, ``save_pretrained`` missing, names whose case mattered for some
options only. Each ends in the correct result or a clear error naming the culprit."""

import logging
import re

import pytest
import torch
from torch import nn

import clq_compile as clq
from clq_compile.build import resolve
from clq_compile.model import retarget_devices
from clq_compile.qlinear import pack_weight
from clq_compile.testing import tiny_pixart

FAST = dict(recipe="rtn", bits="w4a4", measure=False, extra_shapes=None)


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()


# -- lowrank: a branch that outweighs the packed weight is refused ----------------------


def test_lowrank_at_or_above_a_layers_rank_is_a_config_error(pixart):
    model, inputs = pixart
    with pytest.raises(clq.ConfigError, match=r"lowrank=1000000 .* at or above the rank of "
                                              r"20 of the 20 quantized layers .*"
                                              r"'transformer_blocks\.0\.attn1\.to_q'.* "
                                              r"hold the whole weight"):
        clq.quantize(model, [inputs(0)], lowrank=10**6, **FAST)


def test_lowrank_error_names_the_largest_rank_that_fits(pixart):
    """The rank the message offers is the largest that every layer takes: it quantizes
    (its branches smaller than the packed weights), one more is refused."""
    model, inputs = pixart
    with pytest.raises(clq.ConfigError, match=r"outweigh the packed w4a4 weight") as e:
        clq.quantize(model, [inputs(0)], lowrank=32, **FAST)
    fit = int(re.search(r"use lowrank <= (\d+)", str(e.value)).group(1))
    qm = clq.quantize(model, [inputs(0)], lowrank=fit, **FAST)
    for lp in qm.plan.quantized_layers():
        w = model.get_submodule(lp.name).weight
        pw = pack_weight(w, lp, qm.plan.transform_of(lp))  # as the graph holds it
        assert lp.rank == fit and pw.lowrank_bytes <= pw.nbytes - pw.lowrank_bytes
    with pytest.raises(clq.ConfigError, match=f"lowrank={fit + 1} "):
        clq.quantize(model, [inputs(0)], lowrank=fit + 1, **FAST)


# -- dsq: "found none" and "none beat plain rounding" are different news ----------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        return self.net(x)


def test_dsq_that_beats_no_rounding_says_how_many_it_found(caplog):
    """A down-projection already on the int4 grid (integers in [-7, 7], each row reaching
    7, times a power of two) rounds exactly: no dual-scale round can beat plain RTN."""
    model = MLP().eval()
    w = torch.randint(-7, 8, (32, 64)).float()
    w[:, 0] = 7
    model.net[2].weight.data = w / 64
    with caplog.at_level(logging.WARNING, logger="clq_compile"):
        qm = clq.quantize(model, [(torch.randn(2, 16, 32),)], dsq=True, **FAST)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "found 1 MLP down-projection" in text and "beat plain rounding" in text
    assert "found no MLP down-projection" not in text
    assert qm.plan.meta["dsq"]["layers"] == []


# -- record_calls: failed calls, re-entry ----------------------------------------------


class Flaky(nn.Module):
    def forward(self, x):
        if bool((x < 0).any()):
            raise RuntimeError("negative input")
        return x * 2


def test_record_calls_drops_a_call_whose_forward_raised():
    net = Flaky()
    with pytest.raises(RuntimeError, match="negative input"):
        with clq.record_calls(net) as calib:
            net(torch.ones(2))
            with pytest.raises(RuntimeError):
                net(-torch.ones(2))
            net(torch.full((2,), 3.0))
            net(-torch.ones(2))  # raises out of the block
    assert [float(c["x"][0]) for c in calib] == [1.0, 3.0]
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_record_calls_entered_twice_says_to_create_a_new_one():
    net = Flaky()
    recording = clq.record_calls(net)
    with recording as calib:
        net(torch.ones(2))
    with pytest.raises(clq.CalibrationError, match=r"record_calls\(Flaky\) was entered "
                                                   r"before .*create a new"):
        with recording:
            pass
    assert len(calib) == 1 and not net._forward_pre_hooks


# -- the meta device -------------------------------------------------------------------


def test_to_meta_is_refused_and_the_model_still_runs(pixart):
    model, inputs = pixart
    qm = clq.quantize(model, [inputs(0)], **FAST)
    before = qm(**inputs(1))[0]
    with pytest.raises(clq.ConfigError, match="cannot move to the meta device"):
        qm.to("meta")
    with pytest.raises(clq.ConfigError, match="cannot move to the meta device"):
        qm.to(device=torch.device("meta"))
    assert qm.device == torch.device("cpu")
    assert torch.equal(qm(**inputs(1))[0], before)


def test_retargeted_graph_runs_where_its_tensors_are(pixart):
    """Factory ops in the graph (``arange`` of positional/timestep embeddings) carry a
    device; ``.to`` rewrites them with ``retarget_devices``, so the graph runs where its
    tensors are. The meta device stands in for a GPU (on a graph of a copy: the quantized
    model itself refuses the meta device): every op must land on it, none on the CPU."""
    model, inputs = pixart
    qm = clq.quantize(model, [inputs(0)], bits="w8a8", measure=False, extra_shapes=None)
    gm = qm.graph_module
    retarget_devices(gm, torch.device("meta"))
    gm.to("meta")
    x = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs(1).items()}
    call, _ = qm.call_spec.normalize((), x)
    out = torch.utils._pytree.tree_leaves(gm(**call))[0]
    assert out.device.type == "meta" and out.shape == (2, 8, 8, 8)


# -- save_pretrained -------------------------------------------------------------------


def test_save_pretrained_says_how_to_save_and_writes_nothing(pixart, tmp_path):
    model, inputs = pixart
    qm = clq.quantize(model, [inputs(0)], **FAST)
    with pytest.raises(clq.SaveError, match=r"save_pretrained .*qm\.save\(path\).*"
                                            r"clq\.load\(path\).*pipe\.transformer"):
        qm.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


# -- one rule for names: case-insensitive ----------------------------------------------


def test_every_name_valued_option_is_case_insensitive():
    upper = resolve("CLQ", "W4A4", weights="GPTQ", hessian="Fisher", rotation="Adaptive",
                    order="Sorted", cbc="Last", clps_search="Exhaustive",
                    skip_roles=("EMBED", "Final"), budget=0.1, budget_bits="W8A8")
    lower = resolve("clq", "w4a4", weights="gptq", hessian="fisher", rotation="adaptive",
                    order="sorted", cbc="last", clps_search="exhaustive",
                    skip_roles=("embed", "final"), budget=0.1, budget_bits="w8a8")
    assert upper == lower
    assert resolve("RTN", "w4a4", activations="LZS")[1].a_format == "lzs"


def test_unknown_names_are_named_as_given_with_the_lower_case_choices():
    with pytest.raises(clq.ConfigError, match=r"weights='GPTX' .*\['rtn', 'gptq', 'twinlog'\]"):
        resolve("rtn", "w4a4", weights="GPTX")
    with pytest.raises(clq.ConfigError, match=r"unknown recipe 'CLQX'; registered: \[.*'clq'"):
        resolve("CLQX", "w4a4")


def test_extra_shapes_auto_in_any_case(pixart):
    model, inputs = pixart
    qm = clq.quantize(model, [inputs(0)], recipe="rtn", bits="w4a4", measure=False,
                      extra_shapes="AUTO")
    assert len(qm.graphs) == 2  # PixArt specializes its positional table on the size
