"""Text-to-image diffusers teachers: prompts (long, unicode, new at sampling time) and the cache of their
embeddings in the run directory (made once, remade for other prompts or another text encoder)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emd_fast import sample, train
from emd_fast.teachers.diffusers_folder import inspect_folder

from diffusers_models import edit_json, prompts_file, train_main, transformers


@pytest.mark.parametrize("mask", [False, True])
def test_conditioning_is_the_pipelines(sd_folder, tmp_path, mask):
    """The prompts' and the empty prompt's embeddings are StableDiffusionPipeline.encode_prompt's, also for a text
    encoder whose config asks for the padding mask (use_attention_mask), which that pipeline then passes."""
    import diffusers

    from emd_fast.teachers.diffusers_folder import encode_with_unconditional

    folder = shutil.copytree(sd_folder, tmp_path / "pipe")
    edit_json(folder / "text_encoder" / "config.json", use_attention_mask=mask)
    prompts = ["a cat", "a red dog on a green mat"]
    cond, uncond = encode_with_unconditional(inspect_folder(folder), prompts)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    assert torch.allclose(cond.embeds, embeds, rtol=1e-5, atol=1e-6)
    assert torch.allclose(uncond.embeds, negative[:1], rtol=1e-5, atol=1e-6)


def test_a_new_prompt_samples_as_the_same_cached_prompt_does(sd_folder, tmp_path):
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(sd_folder), "--prompts", str(prompts_file(tmp_path)), "--steps",
                      "2") == 0
    by_index, by_text = tmp_path / "i.npz", tmp_path / "t.npz"
    assert sample.main([str(out), "--labels", "1", "1", "--out", str(by_index)]) == 0
    assert sample.main([str(out), "--prompt", "a red dog", "--n", "2", "--out", str(by_text)]) == 0
    with np.load(by_index) as f, np.load(by_text) as g:
        assert np.allclose(f["images"], g["images"], atol=1e-5)


def test_long_unicode_prompts_and_a_tokenizer_without_a_max_length(sd_folder, tmp_path):
    """Prompts longer than the text encoder's positions are truncated (as Stable Diffusion pipelines do), also where
    tokenizer_config.json gives no model_max_length (transformers then says 10**30); unicode and blank lines pass."""
    from emd_fast.teachers.diffusers_folder import encode_prompts

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model_max_length"}))
    assert transformers.AutoTokenizer.from_pretrained(folder / "tokenizer").model_max_length > 10**20
    prompts = prompts_file(tmp_path, "a cat " * 100 + "\n\n \u3000\n\u00fc\u00f1\u00ed \u732b \U0001f431 dog\r\n")
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--prompts", str(prompts), "--steps", "2") == 0
    cond = load_file(str(out / "prompt_embeddings.safetensors"))["cond"]
    assert cond.shape == (2, 8, 16) and torch.isfinite(cond).all()
    # 8 positions: start, 6 words, end; the rest of the long prompt is cut
    assert torch.allclose(cond[0], encode_prompts(inspect_folder(folder), ["a cat a cat a cat"])[0], atol=1e-6)


def test_cached_embeddings_are_those_of_the_runs_prompts_and_text_encoder(sd_folder, tmp_path):
    from emd_fast.problems.diffusers_folder import DiffusersProblem

    cfg = vars(train.build_parser().parse_args(["--teacher", str(sd_folder), "--prompts",
                                                str(prompts_file(tmp_path, "a cat\na dog\nred\n"))]))
    cfg["out"] = str(tmp_path)
    three = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert three.shape == (3, 8, 16) and (tmp_path / "prompt_embeddings.safetensors").is_file()
    again = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert torch.equal(again, three)
    prompts_file(tmp_path, "a dog\n")  # other prompts in the same run directory: encoded anew
    one = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert one.shape == (1, 8, 16) and torch.allclose(one[0], three[1])
    assert load_file(str(tmp_path / "prompt_embeddings.safetensors"))["cond"].shape == (1, 8, 16)


def test_cached_embeddings_of_another_text_encoder_are_encoded_anew(sd_folder, tmp_path):
    import shutil

    from emd_fast.problems.diffusers_folder import DiffusersProblem

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    cfg = vars(train.build_parser().parse_args(["--teacher", str(folder), "--prompts", str(prompts_file(tmp_path))]))
    cfg["out"] = str(tmp_path)
    before = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    # the last op of the text encoder ('text_model.' prefixes it in transformers 4.x)
    final_norm = next(p for name, p in text.named_parameters() if name.endswith("final_layer_norm.bias"))
    with torch.no_grad():
        final_norm += 1.0
    text.save_pretrained(folder / "text_encoder")
    after = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert torch.allclose(after, before + 1.0, atol=1e-5)
