"""Drop-in use in real diffusers pipelines, assembled offline from small components built
from configs: ``DiTPipeline`` (DiT + AutoencoderKL + scheduler) and ``PixArtAlphaPipeline``
(PixArt + a T5 encoder built from a ``transformers`` config + a word-level tokenizer built
with ``tokenizers``; T5's own sentencepiece tokenizer needs a vocabulary file from the hub,
so a small word-level one stands in). Calibration is recorded from the pipeline itself;
``pipe.transformer`` is replaced by the quantized model and ``pipe(...)`` runs unchanged,
at the calibration settings and at others (batch, caption length, resolution)."""

import pytest
import torch

import clq_compile as clq

# W8A8 on random-weight tiny transformers keeps the decoded images ~60-70 dB from the FP
# pipeline's (measured); a transformer that computes something else (wrong weights, inputs
# bound to the wrong names, a graph for the wrong size) lands below 20 dB.
PSNR_FLOOR_DB = 40.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean().clamp(min=1e-12)))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=8, sample_size=16).eval()


@pytest.fixture(scope="module")
def dit_pipe():
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit(pipe, labels, seed=1):
    return pipe(class_labels=labels, num_inference_steps=6, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def test_dit_pipeline_with_quantized_transformer(dit_pipe):
    pipe = dit_pipe
    fp = pipe.transformer
    with clq.record_calls(pipe.transformer, max_calls=6) as calib:
        _dit(pipe, [1, 2], seed=0)
    assert len(calib) == 6 and calib[0]["hidden_states"].shape[0] == 4  # CFG batch of 2x2
    ref1, ref3 = _dit(pipe, [3]), _dit(pipe, [3, 4, 5])
    pipe.transformer = clq.quantize(fp, calib, recipe="rtn", bits="w8a8")
    try:
        img1, img3 = _dit(pipe, [3]), _dit(pipe, [3, 4, 5])  # batch 1 and 3 (CFG: 2 and 6)
    finally:
        pipe.transformer = fp
    assert img1.shape == (1, 3, 16, 16) and img3.shape == (3, 3, 16, 16)
    assert _psnr(img1, ref1) > PSNR_FLOOR_DB
    assert _psnr(img3, ref3) > PSNR_FLOOR_DB


WORDS = ("<pad> </s> <unk> a an the red blue green yellow circle square triangle cross top "
         "bottom left right of and big small").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=32)


@pytest.fixture(scope="module")
def pixart_pipe():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64,
                                      num_layers=1, num_heads=2)).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=32,
        num_embeds_ada_norm=1000).eval()
    pipe = PixArtAlphaPipeline(tokenizer=_tokenizer(), text_encoder=encoder, vae=_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixart(pipe, prompt, seed=1, **kw):
    return pipe(prompt, num_inference_steps=6, output_type="pt", use_resolution_binning=False,
                clean_caption=False, generator=torch.Generator().manual_seed(seed), **kw).images


def test_pixart_pipeline_with_quantized_transformer(pixart_pipe):
    """Calibrated at 16x16 pixels, 12 caption tokens, batch 2 (CFG 4); run at batch 1 and
    3, 8 and 20 tokens, and 24x24 and 32x32 pixels (the graph for other sizes)."""
    pipe = pixart_pipe
    fp = pipe.transformer
    with clq.record_calls(pipe.transformer, max_calls=6) as calib:
        _pixart(pipe, ["a red circle", "blue square top left"], seed=0, max_sequence_length=12)
    runs = [
        dict(prompt="a red circle", max_sequence_length=8),
        dict(prompt=["a red circle", "green cross", "the big yellow triangle"],
             max_sequence_length=20),
        dict(prompt="a red circle", max_sequence_length=8, height=24, width=24),
        dict(prompt=["blue square", "a cross", "red"], max_sequence_length=10, height=32,
             width=32),
    ]
    refs = [_pixart(pipe, **r) for r in runs]
    qm = clq.quantize(fp, calib, recipe="rtn", bits="w8a8")
    pipe.transformer = qm
    try:
        outs = [_pixart(pipe, **r) for r in runs]
    finally:
        pipe.transformer = fp
    assert len(qm.graphs) == 2  # PixArt specializes its positional table: a graph for the rest
    for r, ref, out in zip(runs, refs, outs, strict=True):
        assert out.shape == ref.shape
        assert _psnr(out, ref) > PSNR_FLOOR_DB, r


def test_saved_and_loaded_transformer_in_the_pipeline(pixart_pipe, tmp_path):
    pipe = pixart_pipe
    fp = pipe.transformer
    with clq.record_calls(pipe.transformer, max_calls=4) as calib:
        _pixart(pipe, "a red circle", seed=0, max_sequence_length=12)
    qm = clq.quantize(fp, calib, recipe="clq", bits="w4a8", extra_shapes=None,
                      w_grid=(1.0, 0.9), a_grid=(1.0, 0.9), clps_samples=1)
    run = dict(prompt=["green cross", "a blue square"], max_sequence_length=10)
    pipe.transformer = qm
    try:
        direct = _pixart(pipe, **run)
        pipe.transformer = clq.load(qm.save(tmp_path / "t"))
        loaded = _pixart(pipe, **run)
    finally:
        pipe.transformer = fp
    assert torch.equal(direct, loaded)
