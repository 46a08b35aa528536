"""The embedded tiny random-weight Wan pipeline behind ``memflow demo``."""

import socket

import pytest
import torch
from diffusers import WanPipeline

from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

CPU = torch.device("cpu")
PROMPT = "a red fox runs in the snow"
SEQ = 32


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the tiny Wan pipeline must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def pipe(offline) -> WanPipeline:
    return build_tiny_wan_pipeline(seed=0)


def encode(pipe: WanPipeline, prompt: str) -> torch.Tensor:
    prompt_embeds, _ = pipe.encode_prompt(
        [prompt], do_classifier_free_guidance=False, max_sequence_length=SEQ, device=CPU
    )
    return prompt_embeds


def test_builds_offline_deterministically(offline) -> None:
    rng_state = torch.random.get_rng_state()
    first, again, other = (build_tiny_wan_pipeline(seed=s).transformer for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    same, different = again.state_dict(), other.state_dict()
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, same[name]), name
    assert any(not torch.equal(t, different[n]) for n, t in first.state_dict().items())


def test_components_keep_wan_shape_rules(pipe: WanPipeline) -> None:
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert transformer.in_channels == transformer.out_channels == vae.z_dim == 16
    assert tuple(transformer.patch_size) == (1, 2, 2)
    assert transformer.qk_norm == "rms_norm_across_heads" and transformer.cross_attn_norm
    assert transformer.text_dim == pipe.text_encoder.config.d_model
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert len(vae.latents_mean) == len(vae.latents_std) == 16
    assert pipe.scheduler.config.shift == 5.0
    for model in (pipe.transformer, pipe.vae, pipe.text_encoder):
        assert not model.training
        assert all(p.dtype == torch.float32 and p.device == CPU for p in model.parameters())


def test_parameter_count_is_tiny(pipe: WanPipeline) -> None:
    models = (pipe.transformer, pipe.vae, pipe.text_encoder)
    assert sum(p.numel() for model in models for p in model.parameters()) < 5_000_000


def test_encode_prompt_zero_pads_past_the_prompt(pipe: WanPipeline) -> None:
    embeds = encode(pipe, PROMPT)
    assert embeds.shape == (1, SEQ, pipe.transformer.config.text_dim)
    num_tokens = len(PROMPT.split()) + 1  # + "</s>"
    assert (embeds[0, :num_tokens].abs().sum(dim=-1) > 0).all()
    assert (embeds[0, num_tokens:] == 0).all()
    assert not torch.allclose(embeds, encode(pipe, "a small boat sails on a blue lake"))


def test_tokenizer_is_t5_like_and_maps_unknown_words_to_unk(pipe: WanPipeline) -> None:
    tokenizer = pipe.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer("A Red FOX, xyzzy!").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["a", "red", "fox", ",", "<unk>", "!", "</s>"]
    embeds = encode(pipe, "a quokka photobombs the zeppelin")
    assert torch.isfinite(embeds).all()


def test_transformer_forward_keeps_the_latent_shape(pipe: WanPipeline) -> None:
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe.transformer(
            latents,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=encode(pipe, PROMPT),
            return_dict=False,
        )[0]
    assert out.shape == latents.shape
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_vae_decodes_with_wan_compression(pipe: WanPipeline) -> None:
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    normalised = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = pipe.vae.decode(normalised * std + mean, return_dict=False)[0]
    assert video.shape == (1, 3, 9, 64, 64)
    assert video.abs().max() <= 1.0 and video.std() > 0
