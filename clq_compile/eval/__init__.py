"""Quality benchmark for quantization: a tiny trained shapes text-to-image DiT, its sampler,
a judge, and a harness comparing quantized models with full precision.

    from clq_compile.eval import load_shapes_dit, load_judge, evaluate
    transformer, encoder = load_shapes_dit()
    report = evaluate(transformer, encoder, load_judge())
"""

from clq_compile.eval.harness import (
    CastTransformer,
    MethodResult,
    NoisyTransformer,
    Report,
    calibration_calls,
    evaluate,
    output_sqnr,
    prompts,
    psnr_db,
    quantize_methods,
    save_grid,
    sqnr_db,
)
from clq_compile.eval.judge import ShapeJudge, accuracy, load_judge
from clq_compile.eval.sampler import make_scheduler, record_calibration, sample
from clq_compile.eval.shapes_data import caption, generate, parse_caption, render, tokenize
from clq_compile.eval.shapes_model import (
    CaptionEncoder,
    build_transformer,
    load_config,
    load_shapes_dit,
)

__all__ = [
    "CaptionEncoder", "CastTransformer", "MethodResult", "NoisyTransformer", "Report",
    "ShapeJudge", "accuracy", "build_transformer", "calibration_calls", "caption", "evaluate",
    "generate", "load_config", "load_judge", "load_shapes_dit", "make_scheduler", "output_sqnr",
    "parse_caption", "prompts", "psnr_db", "quantize_methods", "record_calibration", "render",
    "sample", "save_grid", "sqnr_db", "tokenize",
]
