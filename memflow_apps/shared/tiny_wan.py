"""A tiny, download-free Wan2.1-T2V pipeline for ``memflow demo`` and tests.

The weights are RANDOM: the pipeline has the architecture and tensor shapes of Wan2.1-T2V, so
the demo exercises the real plumbing (text encoding, streaming denoising, KV caches, memory,
VAE decoding), but its videos are noise-like. It shows plumbing, not quality. Nothing is read
from disk or the network; building it takes a fraction of a second on a CPU, and the same
seed always gives the same weights.

Components of the :class:`diffusers.WanPipeline` built by :func:`build_tiny_wan_pipeline`:

* ``transformer``: a :class:`~diffusers.WanTransformer3DModel` with the Wan2.1-T2V-1.3B config
  shrunk in width and depth. Its shape rules are kept: 16 latent channels, 1x2x2 patches, RMS
  query/key norms across heads, cross-attention norm and a 3-D RoPE whose head dimension splits
  into time/height/width parts. All its parameters are redrawn (see ``reinitialise``).
* ``vae``: an :class:`~diffusers.AutoencoderKLWan` with a narrow base width but Wan's 8x spatial
  and 4x temporal compression (latents ``[B, 16, F, h, w]`` decode to ``4 * (F - 1) + 1`` frames
  of ``8h x 8w`` pixels) and the real Wan2.1 latent mean/std; diffusers' default random init.
* ``text_encoder``: a 2-layer :class:`~transformers.UMT5EncoderModel`, transformers' default
  random init; its width is the transformer's ``text_dim``.
* ``tokenizer``: a word-level :class:`~transformers.PreTrainedTokenizerFast` over an embedded
  vocabulary of scene words; it lowercases, splits on whitespace and punctuation, maps unknown
  words to ``<unk>`` and appends ``</s>`` like T5's tokenizer.
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with Wan's ``shift=5.0``.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from integrations.wan import WAN21_T2V_1_3B_TRANSFORMER

__all__ = ["build_tiny_wan_pipeline", "build_tiny_wan_tokenizer"]

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2, as in T5

# Lowercase scene words; ids follow the special tokens in this order.
_VOCABULARY_TEXT = """
a an the this that these those some many few one two three four five several every all no
and or but of in on at to into onto from with without by over under above below behind near
beside between through across along around toward towards up down out off inside outside
while as then after before again back away together alone very slowly quickly gently
is are was be being it its he she they his her their them we you i there here
red orange yellow green blue purple pink brown black white gray grey golden silver dark
bright pale colorful
fox dog cat horse bird eagle owl fish whale dolphin bear wolf deer rabbit lion tiger elephant
monkey cow sheep butterfly bee snake duck swan
man woman boy girl child children person people family couple friends dancer runner chef
astronaut knight robot
car bus train bicycle boat ship plane airplane balloon kite ball book cup table chair lamp
window door house castle tower bridge road street path fence umbrella hat dress coat guitar
piano camera clock candle flag flower flowers tree trees leaf leaves grass rock stone sand
water fire smoke light shadow
forest lake river sea ocean beach island mountain mountains hill valley desert field meadow
garden park city town village market room kitchen studio stage sky cloud clouds sun moon star
stars rain snow storm wind fog ice waves
sunset sunrise morning evening night day winter summer spring autumn
walk walks walking run runs running fly flies flying swim swims swimming jump jumps jumping
dance dances dancing sit sits sitting stand stands standing sail sails sailing ride rides
riding look looks looking turn turns turning play plays playing sing sings singing eat eats
eating drink drinks holding holds falls falling rises rising glows glowing shines shining
moves moving drifts drifting floats floating flows flowing sleeps sleeping smiles smiling
waving opens closes enters returns watches follows chases climbs crosses
big small tiny huge tall short long old young new happy sad calm quiet wild snowy sunny rainy
foggy cloudy warm cold soft wet dry beautiful cinematic realistic detailed close view shot
slow motion aerial wide
, . ! ? ' -
"""
VOCABULARY = (*SPECIAL_TOKENS, *_VOCABULARY_TEXT.split())
VOCAB_SIZE = len(VOCABULARY)

TINY_TEXT_ENCODER = {
    "vocab_size": VOCAB_SIZE,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

# head_dim 16 splits into RoPE parts t=8, h=4, w=4 (h = w = 2 * (head_dim // 6)).
TINY_TRANSFORMER = {
    **WAN21_T2V_1_3B_TRANSFORMER,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "ffn_dim": 128,
    "freq_dim": 32,
    "text_dim": TINY_TEXT_ENCODER["d_model"],
}

# dim_mult has 4 levels (3 spatial 2x steps = 8x); temperal_downsample halves time twice (4x).
# latents_mean / latents_std are left at the constructor's defaults: the real Wan2.1 values.
TINY_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

SCHEDULER = {"num_train_timesteps": 1000, "shift": 5.0}

# Std of the transformer's biases and modulation tables; weight matrices use 1 / sqrt(fan_in).
SMALL_INIT_STD = 0.02


def build_tiny_wan_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-like word-level tokenizer over :data:`VOCABULARY`, built in memory."""
    vocab = {word: index for index, word in enumerate(VOCABULARY)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=512,
        padding_side="right",
    )


def reinitialise(model: torch.nn.Module) -> None:
    """Redraw every parameter so that no path is zero (diffusers zero-initialises some layers).

    Weight matrices get N(0, 1 / fan_in), which keeps activations near unit scale at this tiny
    width (a fixed 0.02 would all but mute the text and timestep paths); biases and modulation
    tables get N(0, SMALL_INIT_STD**2); norms get unit scales and zero shifts.
    """
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, parameter in module.named_parameters(recurse=False):
                if is_norm:
                    parameter.fill_(1.0 if name in ("weight", "gamma") else 0.0)
                elif name == "weight" and parameter.ndim >= 2:
                    parameter.normal_(0.0, parameter[0].numel() ** -0.5)
                else:
                    parameter.normal_(0.0, SMALL_INIT_STD)


def _tiny_transformer(num_layers: int = TINY_TRANSFORMER["num_layers"]) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": num_layers})
    reinitialise(model)
    return model


def build_tiny_wan_transformer(
    seed: int = 0, num_layers: int = TINY_TRANSFORMER["num_layers"]
) -> WanTransformer3DModel:
    """A random-weight transformer of the tiny pipeline's architecture with ``num_layers``
    blocks (float32, CPU, eval mode), for work that needs no other component; the same ``seed``
    always gives the same weights, the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _tiny_transformer(num_layers).eval()


def build_tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A complete random-weight Wan2.1-T2V-architecture pipeline (float32, CPU, eval mode).

    The same ``seed`` always gives the same weights; the global torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER))
        transformer = _tiny_transformer()
        vae = AutoencoderKLWan(**TINY_VAE)
    pipe = WanPipeline(
        tokenizer=build_tiny_wan_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        transformer=transformer,
    )
    for model in (text_encoder, transformer, vae):
        model.eval()
    return pipe
