"""One attention function over diffusers' backends, and its dispatch rules."""

import pytest
import torch

import memflow_adapter.attention as attention_module
from memflow_adapter.attention import ATTENTION_BACKENDS, attention, check_attention_backend


def reference_attention(query, key, value):
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).float()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "math", "flex"])
def test_cpu_backends_compute_softmax_attention(backend, generator):
    query = torch.randn(2, 24, 3, 16, generator=generator)
    key = torch.randn(2, 40, 3, 16, generator=generator)
    value = torch.randn(2, 40, 3, 16, generator=generator)
    torch.testing.assert_close(
        attention(query, key, value, backend),
        reference_attention(query, key, value),
        rtol=1e-5,
        atol=1e-5,
    )


def test_non_contiguous_head_major_keys_are_accepted(generator):
    query = torch.randn(1, 8, 2, 16, generator=generator)
    key_head_major = torch.randn(1, 2, 12, 16, generator=generator)
    value_head_major = torch.randn(1, 2, 12, 16, generator=generator)
    key, value = key_head_major.transpose(1, 2), value_head_major.transpose(1, 2)
    assert not key.is_contiguous()
    torch.testing.assert_close(
        attention(query, key, value), reference_attention(query, key, value), rtol=1e-5, atol=1e-5
    )


def test_backends_map_to_diffusers_dispatch_names():
    assert {name: backend.value for name, backend in ATTENTION_BACKENDS.items()} == {
        "sdpa": "native",
        "math": "_native_math",
        "flex": "flex",
        "xformers": "xformers",
    }


def test_an_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"attention_backend must be one of \['flex', 'math'"):
        check_attention_backend("flash9", torch.device("cpu"))


def test_xformers_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(attention_module, "_xformers_importable", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'memflow-adapter\[xformers\]'"):
        check_attention_backend("xformers", torch.device("cuda"))


def test_xformers_on_cpu_tensors_is_refused_before_any_kernel_runs(monkeypatch):
    monkeypatch.setattr(attention_module, "_xformers_importable", lambda: True)
    with pytest.raises(ValueError, match="runs on CUDA tensors only, got tensors on 'cpu'"):
        attention(
            torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), "xformers"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers runs on CUDA only")
def test_xformers_matches_sdpa_on_cuda():
    pytest.importorskip("xformers")
    g = torch.Generator(device="cuda").manual_seed(0)
    query, key, value = (torch.randn(1, 64, 4, 64, device="cuda", generator=g) for _ in range(3))
    torch.testing.assert_close(
        attention(query, key, value, "xformers"),
        attention(query, key, value, "sdpa"),
        rtol=2e-3,
        atol=2e-3,
    )
