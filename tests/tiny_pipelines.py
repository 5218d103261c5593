"""Tiny random-weight pipeline folders of the text-to-image families (SD3 / SD3.5, FLUX.1 dev / schnell, SDXL),
built from configs and saved with ``save_pretrained``; nothing is downloaded: the CLIP and T5 tokenizers are written
here from a few words. Each loads with its pipeline's ``from_pretrained`` and runs on the CPU in well under a second.

Widths differ on purpose (CLIP 12 and 20 wide, T5 40): a concatenation, padding or pooled-embedding mix-up is a shape
error. Latents have 4 channels and the VAE two blocks: 16 x 16 images <-> 8 x 8 latents (VAE factor 2).
Shared helpers of the per-family tests (tests/test_sd3.py, test_flux.py, test_sdxl.py, test_teacher_refusals.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import torch
import transformers

from emd_fast import train

import diffusers_models
from diffusers_models import SD_BETAS, edit_json  # noqa: F401 - shared with the family tests
from helpers import (  # noqa: F401 - shared with the family tests
    final_tensors,
    losses,
    no_compile_cache_chosen,
    one_line_error,
    train_cli,
)

WORDS = ["a", "cat", "dog", "red", "photo", "of"]
PROMPTS = ["a red cat", "a photo of a dog"]
CLIP_LENGTH = 8  # the CLIP tokenizers' model_max_length (77 in the real models)
T5_LENGTH = 8  # --max-sequence-length of the tiny SD3 / FLUX runs (256 / 512 by default)
PIXELS = 16  # image size of the tiny runs (--resolution)
SMALL = ["--steps", "2", "--batch", "2", "--K", "1", "--eval-every", "2", "--eval-samples", "4", "--ckpt-every", "1",
         "--quiet", "--device", "cpu", "--phase-every", "0"]


def quiet() -> None:
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


quiet()


# --- tokenizers and text encoders --------------------------------------------------------------------------------

def clip_tokenizer(directory: Path, pad_token: str = "<|endoftext|>") -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make each word one token. <|startoftext|> and <|endoftext|> come last, as
    in the real vocabulary: the real text encoder configs say eos_token_id 2, for which transformers pools the
    output at the highest token id. SDXL's and SD3's second tokenizer pads with '!' (id 0), the first with
    <|endoftext|>."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = sorted(set("".join(WORDS)))
    vocab, merges = ["!", *letters, *(c + "</w>" for c in letters)], []
    for word in WORDS:
        for k in range(2, len(word) + 1):
            left, right = word[:k - 1], word[k - 1] + ("</w>" if k == len(word) else "")
            merges.append(f"{left} {right}")
            if left + right not in vocab:
                vocab.append(left + right)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                      model_max_length=CLIP_LENGTH, pad_token=pad_token)


def t5_tokenizer(directory: Path):
    """A T5 unigram tokenizer written as tokenizer.json with the ``tokenizers`` library (no sentencepiece model),
    loaded by transformers' T5 tokenizer. Ids: <pad> 0, </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    directory.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -4.0) for c in sorted(set("".join(WORDS)))]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5TokenizerFast", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
         "extra_ids": 0, "model_max_length": 512}))
    return transformers.T5TokenizerFast.from_pretrained(str(directory))


def clip_text(tokenizer, hidden: int, projection: bool, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, projection_dim=hidden, bos_token_id=0,
        eos_token_id=2, pad_token_id=1)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config).eval()


def t5_text(tokenizer, seed: int):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(tokenizer.get_vocab()), d_model=40, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return transformers.T5EncoderModel(config).eval()


def vae(scaling_factor: float, shift_factor: float | None, seed: int, quant_conv: bool = False, **kw):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=PIXELS, scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv, **kw)


# --- pipelines ---------------------------------------------------------------------------------------------------

def sd3_pipeline(path: Path, sd35: bool = False, t5: bool = True, seed: int = 0, layers: int = 2,
                 **scheduler) -> Path:
    """SD3 (sd35: SD3.5's dual attention and RMS qk-norm), FlowMatchEuler shift 3 unless ``scheduler`` says
    otherwise, SD3's VAE scaling and shift without quant convs; t5=False: a folder without text_encoder_3; ``layers``
    joint transformer blocks (SD3-medium: 24)."""
    tok1 = clip_tokenizer(path.parent / f"{path.name}-tok1")
    tok2 = clip_tokenizer(path.parent / f"{path.name}-tok2", "!")
    tok3 = t5_tokenizer(path.parent / f"{path.name}-tok3")
    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=40, caption_projection_dim=16, pooled_projection_dim=12 + 20,
        pos_embed_max_size=16, **extra)
    diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **scheduler}),
        vae=vae(1.5305, 0.0609, seed + 4), text_encoder=clip_text(tok1, 12, True, seed + 1), tokenizer=tok1,
        text_encoder_2=clip_text(tok2, 20, True, seed + 2), tokenizer_2=tok2,
        text_encoder_3=t5_text(tok3, seed + 3) if t5 else None, tokenizer_3=tok3 if t5 else None,
    ).save_pretrained(path)
    return path


def flux_pipeline(path: Path, dev: bool = True, seed: int = 0, layers: tuple[int, int] = (1, 1)) -> Path:
    """FLUX.1 dev (guidance embedding, dynamic shifting as FLUX.1-dev's scheduler) or schnell (none, shift 1);
    ``layers``: its double and single transformer blocks (FLUX.1: 19 and 38)."""
    tok1, tok2 = clip_tokenizer(path.parent / f"{path.name}-tok1"), t5_tokenizer(path.parent / f"{path.name}-tok2")
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers[0], num_single_layers=layers[1], attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=12, guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        **(dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096) if dev else dict(shift=1.0)))
    diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae(0.3611, 0.1159, seed + 4),
        text_encoder=clip_text(tok1, 12, False, seed + 1), tokenizer=tok1, text_encoder_2=t5_text(tok2, seed + 3),
        tokenizer_2=tok2).save_pretrained(path)
    return path


SDXL_TIME_DIM = 4  # addition_time_embed_dim (256 in SDXL)


def sdxl_pipeline(path: Path, force_zeros: bool = True, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """SDXL base: CLIPTextModel (12 wide) + CLIPTextModelWithProjection (20), text_time added conditions, SDXL's
    EulerDiscreteScheduler ("leading" spacing) and VAE scaling."""
    tok1 = clip_tokenizer(path.parent / f"{path.name}-tok1")
    tok2 = clip_tokenizer(path.parent / f"{path.name}-tok2", "!")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12 + 20, norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + 20)
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1,
                                                 prediction_type=prediction_type)
    diffusers.StableDiffusionXLPipeline(
        vae=vae(0.13025, None, seed + 4, quant_conv=True), text_encoder=clip_text(tok1, 12, False, seed + 1),
        text_encoder_2=clip_text(tok2, 20, True, seed + 2), tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros).save_pretrained(path)
    return path


# --- runs --------------------------------------------------------------------------------------------------------

def prompts_file(directory: Path, text: str = "\n".join(PROMPTS) + "\n") -> Path:
    return diffusers_models.prompts_file(directory, text)


train_main = train_cli(*SMALL)


def run_config(*args) -> dict:
    """The config the training command makes of ``args`` (with --out)."""
    return vars(train.build_parser().parse_args(list(args)))


def copy_folder(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def trains_resumes_and_samples(folder: Path, tmp_path: Path, *args) -> dict:
    """The CLI on a tiny pipeline: 2 steps straight, and 1 step then a resume to 2 with every text encoder moved
    away (the run's cached conditioning is all a resume reads: T5 is never loaded again) end bit for bit equal;
    the cached prompts (a row each) and a new prompt sample decoded images. Returns the straight run's summary."""
    import numpy as np

    from emd_fast import sample

    folder = copy_folder(folder, tmp_path / "pipe")
    args = ["--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS), *args]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(straight, *args) == 0
    assert train_main(split, *args, "--steps", "1") == 0
    away = tmp_path / "away"
    away.mkdir()
    for encoder in folder.glob("text_encoder*"):
        encoder.rename(away / encoder.name)
    assert train.main(["--out", str(split), "--resume", "--steps", "2", "--quiet"]) == 0
    a, b = final_tensors(straight), final_tensors(split)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    names = {part for k in a for part in k.split(".")}  # the conditioning, time ids and VAE are not checkpointed
    assert not names & {"prompts", "embeddings", "pooled", "uncond", "time_ids", "vae", "text_encoder"}
    assert sample.main([str(split), "--prompt", "a cat"]) == 2  # a new prompt needs the text encoders
    for encoder in away.iterdir():
        encoder.rename(folder / encoder.name)
    arrays = tmp_path / "s.npz"
    assert sample.main([str(straight), "--per-class", "2", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (4, 3, PIXELS, PIXELS) and f["labels"].tolist() == [0, 0, 1, 1]
        assert np.isfinite(f["images"]).all()
    grid = tmp_path / "cat.png"
    assert sample.main([str(straight), "--prompt", "a cat", "--n", "2", "--out", str(grid), str(arrays)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG" and (straight / "samples" / "final.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(arrays) as f:
        assert f["images"].shape == (2, 3, PIXELS, PIXELS) and f["labels"].tolist() == [-1, -1]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["problem"] == "DiffusersProblem" and np.isfinite(summary["final"]["pixel_std"])
    return summary


def compiles_regionally_as_eager(folder: Path, tmp_path: Path, monkeypatch, capsys, blocks: int, *args):
    """``--compile`` (aot_eager) compiles the transformer's ``blocks`` blocks of each network, not the whole networks;
    12 iterations give the eager run's losses within fp32 rounding and build no graph after the warm-up."""
    import torch._dynamo

    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")
    no_compile_cache_chosen(monkeypatch)
    torch._dynamo.reset()
    args = ["--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS), *args,
            "--steps", "12", "--eval-every", "0", "--ckpt-every", "0"]
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    assert train_main(eager, *args) == 0
    capsys.readouterr()
    assert train_main(comp, *args, "--compile") == 0
    names = ", ".join(f"{name} ({blocks} blocks)" for name in ("generator", "student", "teacher network"))
    assert f"regional): compiled {names}" in capsys.readouterr().err
    curves = [[row[1:] for row in losses(run)] for run in (eager, comp)]  # (loss_g, loss_s) per step
    assert len(curves[0]) == 12
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-6)
    graphs = json.loads((comp / "summary.json").read_text())["compiled_graphs"]
    assert graphs["warmup"] > 0 and graphs["after_warmup"] == 0, graphs


def bf16_checkpointed_step_makes_no_host_sync(folder: Path, tmp_path: Path, *args):
    """A --precision bf16 --grad-checkpoint --finite-check deferred --channels-last run: the frozen teacher in bf16,
    generator and student fp32 with activation checkpointing (the same gradients as without), and an iteration that
    reads no tensor value on the host (it can be captured in a CUDA graph). Returns the Run."""
    import copy

    from emd_fast.training.build import Run

    from helpers import NoHostRead

    out = tmp_path / "run"
    out.mkdir()  # the run directory the command would make: the prompt conditioning is cached there
    cfg = run_config("--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS),
                     "--precision", "bf16", "--grad-checkpoint", "--finite-check", "deferred", "--channels-last",
                     "--batch", "2", "--K", "1", "--out", str(out), *args)
    run = Run(cfg, torch.device("cpu"), fit_teacher=False)
    distiller = run.distiller
    dtypes = {name: {p.dtype for p in net.parameters()} for name, net in
              (("teacher", run.teacher.net), ("generator", distiller.generator), ("student", distiller.student))}
    assert dtypes == {"teacher": {torch.bfloat16}, "generator": {torch.float32}, "student": {torch.float32}}
    assert not any(p.requires_grad for p in run.teacher.net.parameters())
    assert all(net.model.is_gradient_checkpointing for net in (distiller.generator.denoiser, distiller.student))
    student, plain = distiller.student, copy.deepcopy(distiller.student)
    plain.model.disable_gradient_checkpointing()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, *run.teacher.data_shape, generator=g), torch.tensor([1, 0])
    t = run.teacher.schedule.sample_t(2, g, "cpu")
    grads = []
    for net in (student, plain):
        net.zero_grad()
        net(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert distiller.deferred
    distiller.step()  # lazy state (optimizer moments) first
    with NoHostRead():
        distiller.step()
    assert torch.isfinite(run.teacher.denoise(x, t, y)).all()
    return run
