"""`mistralpy quantize --format gguf` round trip on the tiny mistral3 checkpoint (real
architecture, Tekken vocabulary): the text GGUF + mmproj GGUF, loaded with --mmproj, equal the
HF-layout model (itself checked against transformers in test_mistral3_vs_transformers).

Oracles: the HF-layout model in float32 for the f32 files; for q8_0 files the HF-layout model
with `--isq q8_0`, whose layers the writer quantizes alike (same layers, same quantizer), so
the stored bytes and the logits must be the same.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from mistralpy.checkpoint.loader import load_model
from mistralpy.model.config import ConfigError, config_from_gguf, read_config
from mistralpy.model.gguf_file import open_gguf
from mistralpy.processing.chat_template import ChatTemplate, build_chat_prompt
from mistralpy.processing.images import ImageProcessorConfig, preprocess_image
from mistralpy.processing.tokenizer import Tokenizer
from mistralpy.quant.isq import QuantizedLinear
from mistralpy.server.cli import main
from mistralpy.testing.probes import prefill_logits
from mistralpy.testing.tiny_checkpoint import write_checkpoint
from tests.seeds import fresh_seeds

SEED = fresh_seeds(1, "gguf_mmproj")[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny checkpoint and its GGUF files: {"src", "f32", "f32_mmproj", "q8_0", ...}."""
    root = tmp_path_factory.mktemp("mmproj")
    src = write_checkpoint(root / "tiny", "tiny", seed=SEED)
    found = {"src": src}
    for outtype in ("f32", "q8_0"):
        out = root / outtype
        argv = ["quantize", str(src), "--format", "gguf", "--outtype", outtype, "--out", str(out)]
        assert main(argv) == 0
        label = outtype.upper()
        found[outtype] = out / f"tiny-{label}.gguf"
        found[f"{outtype}_mmproj"] = out / f"mmproj-tiny-{label}.gguf"
    return found


def _image_loader(files):
    config = ImageProcessorConfig.from_gguf_mmproj(files["f32_mmproj"])
    hf = ImageProcessorConfig.from_model_dir(files["src"])
    # GGUF stores mean / std as float32 (as llama.cpp writes them)
    assert config.image_mean == pytest.approx(hf.image_mean, rel=1e-7)
    assert config.image_std == pytest.approx(hf.image_std, rel=1e-7)
    assert config == dataclasses.replace(
        hf, image_mean=config.image_mean, image_std=config.image_std
    )
    gen = torch.Generator().manual_seed(SEED)
    pixels = (torch.rand(50, 90, 3, generator=gen) * 255).to(torch.uint8).numpy()

    def load(_source: str):
        return preprocess_image(Image.fromarray(pixels), config)

    return load


def _prompts(files, gguf_file):
    """(text prompt, image prompt) of the same chats through the HF-layout tokenizer and
    template and through the GGUF's; asserts their ids are equal."""
    ours = (Tokenizer.from_dir(files["src"]), ChatTemplate.from_dir(files["src"]))
    theirs = (Tokenizer.from_gguf(gguf_file), ChatTemplate.from_gguf(gguf_file))
    loader = _image_loader(files)
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "x.png"}},
                ],
            }
        ],
    ]
    prompts = []
    for chat in chats:
        a = build_chat_prompt(*ours, chat, image_loader=loader)
        b = build_chat_prompt(*theirs, chat, image_loader=loader)
        assert a.token_ids == b.token_ids
        prompts.append(a)
    assert len(prompts[1].images) == 1
    return prompts


def _logits(model, prompt) -> torch.Tensor:
    """(T, vocab) float32 logits of one prefill of the prompt, its images encoded."""
    return prefill_logits(model, prompt.token_ids, [im.pixel_values for im in prompt.images])


def _assert_same_config(ours, oracle) -> None:
    """Equal configs, epsilons up to GGUF's float32 storage (llama.cpp writes float32 too)."""
    text, vision = ours.text_config, ours.vision_config
    assert text.rms_norm_eps == pytest.approx(oracle.text_config.rms_norm_eps, rel=1e-6)
    assert vision.rms_norm_eps == pytest.approx(oracle.vision_config.rms_norm_eps, rel=1e-6)
    assert ours == dataclasses.replace(
        oracle,
        dtype=None,
        text_config=dataclasses.replace(oracle.text_config, rms_norm_eps=text.rms_norm_eps),
        vision_config=dataclasses.replace(oracle.vision_config, rms_norm_eps=vision.rms_norm_eps),
    )


def _assert_close(ours: torch.Tensor, oracle: torch.Tensor) -> None:
    assert (ours - oracle).abs().max() <= 1e-4 * oracle.abs().max()


def test_f32_files_equal_the_hf_layout_model(files):
    prompts = _prompts(files, files["f32"])
    oracle = load_model(files["src"], torch.float32, "cpu")
    model = load_model(files["f32"], torch.float32, "cpu", mmproj=files["f32_mmproj"])
    _assert_same_config(model.config, oracle.config)
    for prompt in prompts:
        _assert_close(_logits(model, prompt), _logits(oracle, prompt))


def test_q8_0_files_serve_their_blocks_like_isq(files):
    prompts = _prompts(files, files["q8_0"])
    oracle = load_model(files["src"], torch.float32, "cpu", isq="q8_0")
    model = load_model(files["q8_0"], torch.float32, "cpu", mmproj=files["q8_0_mmproj"])
    layer = model.language_model.layers[0]
    for module in (layer.self_attn.qkv_proj, layer.mlp.down_proj, model.lm_head):
        assert isinstance(module, QuantizedLinear) and module.fmt.name == "q8_0"
    ref = oracle.language_model.layers[0].self_attn.qkv_proj
    assert torch.equal(layer.self_attn.qkv_proj.qweight, ref.qweight)  # q/k un-permuted
    vision = model.vision_tower.transformer.layers[0].attention.qkv_proj
    assert type(vision) is not QuantizedLinear  # the vision file keeps the stored float type
    for prompt in prompts:
        _assert_close(_logits(model, prompt), _logits(oracle, prompt))


def test_text_gguf_alone_is_a_text_only_model(files):
    model = load_model(files["f32"], torch.float32, "cpu")
    assert not model.config.has_vision and model.vision_tower is None
    oracle = load_model(files["src"], torch.float32, "cpu")
    text_prompt = _prompts(files, files["f32"])[0]
    _assert_close(_logits(model, text_prompt), _logits(oracle, text_prompt))


def test_mismatched_mmproj_is_refused(files):
    text, mmproj = open_gguf(files["f32"]), open_gguf(files["f32_mmproj"])
    wrong_size = {**mmproj.metadata, "clip.vision.projection_dim": 4096}
    with pytest.raises(ConfigError, match="hidden size is 64"):
        config_from_gguf(text, dataclasses.replace(mmproj, metadata=wrong_size))
    wrong_kind = {**mmproj.metadata, "clip.projector_type": "gemma3"}
    with pytest.raises(ConfigError, match="projector type 'gemma3'"):
        config_from_gguf(text, dataclasses.replace(mmproj, metadata=wrong_kind))
    with pytest.raises(ConfigError, match="not a llama.cpp vision projector"):
        config_from_gguf(text, text)  # the text file given as --mmproj
    with pytest.raises(ConfigError, match="--mmproj goes with a GGUF model"):
        read_config(files["src"], files["f32_mmproj"])


def test_runner_with_mmproj_answers_an_image_chat_as_the_checkpoint(files):
    """End to end through the Python API (engine, template, image pipeline): the f32 GGUF with
    its mmproj answers a chat with an image with the same greedy tokens as the checkpoint."""
    import base64
    import io

    from mistralpy import ChatCompletionRequest, Runner, Which

    gen = torch.Generator().manual_seed(SEED)
    pixels = (torch.rand(40, 60, 3, generator=gen) * 255).to(torch.uint8).numpy()
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    request = ChatCompletionRequest(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        max_tokens=6,
        temperature=0.0,
    )
    gguf = files["f32"]
    which = Which.GGUF(str(gguf.parent), gguf.name, mmproj=str(files["f32_mmproj"]))
    answers = []
    for selector in (which, Which.VisionPlain(model_id=str(files["src"]))):
        runner = Runner(which=selector, max_model_len=512, device="cpu")
        try:
            res = runner.send_chat_completion_request(request)
        finally:
            runner.shutdown()
        answers.append((res.usage.prompt_tokens, res.choices[0].message.content))
    assert answers[0] == answers[1]  # prompt length (image tokens included) and text
