"""clq.inspect: one row per linear with the plan's decisions, plus the summary line."""

import re

import clq_compile as clq
from clq_compile.passes.rewrite import quant_linear_nodes
from clq_compile.testing import tiny_pixart


def test_inspect_rows_and_summary():
    model, inputs = tiny_pixart()
    qm = clq.quantize(model, [inputs(0), inputs(1)], recipe="clq", bits="w4a4",
                      w_grid=(1.0, 0.9), a_grid=(1.0, 0.9), extra_shapes=None)
    text = clq.inspect(qm)
    lines = text.splitlines()
    assert len(lines) == 2 + len(qm.plan.layers) + 1  # header, rule, rows, summary
    row = next(line for line in lines if line.startswith("transformer_blocks.0.attn1.to_q "))
    lp = qm.plan.layers["transformer_blocks.0.attn1.to_q"]
    assert "attn_q" in row and "w4a4" in row and "obs" in row and lp.target in row
    assert f"{lp.w_clip:.2f}/{lp.a_clip:.2f}" in row and f"{lp.sqnr_db:.1f}" in row
    skipped = next(line for line in lines if line.startswith("proj_out "))
    assert "skip: final projection" in skipped
    n_q = len(qm.plan.quantized_layers())
    m = re.search(r"(\d+)/(\d+) linears quantized", lines[-1])
    assert (int(m.group(1)), int(m.group(2))) == (n_q, len(qm.plan.layers))
    assert "x)" in lines[-1]
    # q/k/v share a quantizer: fewer GEMMs than layers, counted from the graph
    gemms = quant_linear_nodes(qm.graph_module)
    assert f"run as {len(gemms)} quantized GEMMs, {len(gemms)} activation quantizers" \
        in lines[-1] and len(gemms) < n_q
    # each block's norm1 (into q/k/v's shared transform or quantizer), norm2 and GELU
    blocks = len(model.transformer_blocks)
    assert (f"producers fused into their quantizers: gelu_tanh {blocks}, "
            f"layer_norm {2 * blocks}") in lines[-1]
