"""Property-based tests for DropPos: run `python -m pytest -q` (all) or `python -m pytest -q -m "not slow"`.

The first half follows droppos.py step by step, the second train.py section by section. Everything
runs in fp32 on the CPU with tiny models, so the whole file stays fast on a laptop.
"""

import argparse
import datetime
import errno
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout
from functools import partial
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import droppos
import train

# One hypothesis profile for the file: no deadline (a shared 2-core machine has slow moments) and
# no too-slow health check (model-level examples take a fraction of a second). Each test chooses
# its own max_examples.
settings.register_profile("droppos", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("droppos")

# ===== droppos.py =====

from droppos import (
    Decoder,
    DropPos,
    PatchEmbed,
    ViT,
    attentive_weights,
    drop_positions,
    gaussian_position_targets,
    patchify,
    position_accuracy,
    position_loss,
    random_masking,
    sigma_at,
    sincos_pos_embed,
    unpatchify,
)

# Tiny widths keep every model-level test well under a second per example on two CPU cores.
TINY = dict(dim=32, depth=1, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def tiny_model(img_size=8, patch_size=2, **kw):
    return DropPos(img_size, patch_size, **{**TINY, **kw})


def n_visible(N, mask_ratio):
    # The paper's counting rule, written out independently of droppos.py.
    return int(N * (1 - mask_ratio))


def n_dropped(n_vis, pos_mask_ratio):
    return n_vis - int(n_vis * (1 - pos_mask_ratio))


def grid_coords(h, w):
    """(N, 2) float64 (row, col) of each raster-order patch, built with plain Python loops."""
    return torch.tensor([[k // w, k % w] for k in range(h * w)], dtype=torch.float64)


# Naming the argument: "mask_ratio" is a substring of "pos_mask_ratio", so the plain name must
# not be preceded by "pos_" for a mask_ratio error to count as naming the right argument.
MASK_RATIO_MSG = r"(?<!pos_)mask_ratio"


# --------------------------------------------------------------------------------------------
# 1. Patchify
# --------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(B=st.integers(1, 3), C=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5),
       p=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_unpatchify_inverts_patchify(B, C, h, w, p, seed):
    x = torch.randn(B, C, h * p, w * p, generator=torch.Generator().manual_seed(seed))
    patches = patchify(x, p)
    assert patches.shape == (B, h * w, p * p * C)
    assert torch.equal(unpatchify(patches, p, (h, w)), x)


@settings(max_examples=30)
@given(C=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), p=st.integers(1, 4))
def test_patch_k_is_pixels_at_row_k_div_w_col_k_mod_w_in_p1_p2_c_order(C, h, w, p):
    # Distinct pixel values, so any misplaced or reordered element shows.
    x = torch.arange(2 * C * h * p * w * p, dtype=torch.float32).reshape(2, C, h * p, w * p)
    patches = patchify(x, p)
    for k in range(h * w):
        r, c = k // w, k % w
        block = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]          # (B, C, p1, p2)
        expected = block.permute(0, 2, 3, 1).reshape(2, -1)           # (p1 p2 c)
        assert torch.equal(patches[:, k], expected)


@settings(max_examples=15)
@given(C=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4), p=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_patch_embedding_of_patch_vectors_equals_the_stride_p_convolution(C, h, w, p, seed):
    # The weight is stored as timm's conv; applying it to (p1 p2 c) vectors must be the same map,
    # otherwise exported checkpoints would mean something else in timm.
    torch.manual_seed(seed)
    embed = PatchEmbed(p, C, 8)
    x = torch.randn(2, C, h * p, w * p)
    conv = embed.proj(x).flatten(2).transpose(1, 2)                  # (B, N, D), raster order
    torch.testing.assert_close(embed(patchify(x, p)), conv, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Argument checking (ValueError naming the argument)
# --------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(H=st.integers(1, 24), W=st.integers(1, 24), p=st.integers(1, 6))
def test_model_builds_iff_patch_size_divides_the_image_and_names_img_size_otherwise(H, W, p):
    # mask_ratio=0 / pos_mask_ratio=1 are valid for every grid, even a single patch.
    build = partial(DropPos, (H, W), p, **TINY, mask_ratio=0.0, pos_mask_ratio=1.0,
                    attentive=False)
    if H % p == 0 and W % p == 0:
        model = build()
        assert model.grid == (H // p, W // p)
    else:
        with pytest.raises(ValueError, match="img_size"):
            build()


@pytest.mark.parametrize("p", [0, -2])
def test_nonpositive_patch_size_raises_value_error_naming_patch_size(p):
    with pytest.raises(ValueError, match="patch_size"):
        DropPos(8, p, **TINY)


@settings(max_examples=60)
@given(h=st.integers(1, 6), w=st.integers(1, 6),
       mask_ratio=st.floats(-1.0, 2.0, allow_nan=False))
@example(h=4, w=4, mask_ratio=0.0)
@example(h=4, w=4, mask_ratio=1.0)
@example(h=4, w=4, mask_ratio=0.95)     # int(16 * 0.05) = 0: no visible patch
@example(h=4, w=4, mask_ratio=-0.1)
def test_mask_ratio_is_accepted_iff_it_leaves_a_visible_patch(h, w, mask_ratio):
    N = h * w
    valid = 0 <= mask_ratio < 1 and n_visible(N, mask_ratio) >= 1
    build = partial(DropPos, (2 * h, 2 * w), 2, **TINY, mask_ratio=mask_ratio,
                    pos_mask_ratio=1.0)
    if valid:
        assert build().n_vis == n_visible(N, mask_ratio)
    else:
        with pytest.raises(ValueError, match=MASK_RATIO_MSG):
            build()


@settings(max_examples=60)
@given(n_vis=st.integers(1, 20), pos_mask_ratio=st.floats(-1.0, 2.0, allow_nan=False))
@example(n_vis=8, pos_mask_ratio=0.0)
@example(n_vis=8, pos_mask_ratio=1.0)
@example(n_vis=8, pos_mask_ratio=1.5)
@example(n_vis=8, pos_mask_ratio=-0.5)
@example(n_vis=8, pos_mask_ratio=1e-20)  # 1 - 1e-20 == 1.0 in floating point: nothing dropped
def test_pos_mask_ratio_is_accepted_iff_it_drops_a_position(n_vis, pos_mask_ratio):
    # A 1 x n_vis grid with mask_ratio=0 makes every patch visible, so n_vis is exact.
    valid = 0 < pos_mask_ratio <= 1 and n_dropped(n_vis, pos_mask_ratio) >= 1
    build = partial(DropPos, (2, 2 * n_vis), 2, **TINY, mask_ratio=0.0,
                    pos_mask_ratio=pos_mask_ratio)
    if valid:
        model = build()
        assert model.n_vis - model.n_pos_keep == n_dropped(n_vis, pos_mask_ratio)
    else:
        with pytest.raises(ValueError, match="pos_mask_ratio"):
            build()


@pytest.mark.parametrize("arg", ["mask_ratio", "pos_mask_ratio"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_ratios_raise_value_error_naming_the_argument(arg, value):
    pattern = MASK_RATIO_MSG if arg == "mask_ratio" else "pos_mask_ratio"
    with pytest.raises(ValueError, match=pattern):
        tiny_model(**{arg: value})


def test_unknown_pos_embed_raises_value_error_naming_pos_embed():
    with pytest.raises(ValueError, match="pos_embed"):
        tiny_model(pos_embed="rope")


@pytest.mark.parametrize("tau", [0.0, -0.1])
def test_nonpositive_tau_raises_value_error_naming_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        tiny_model(tau=tau)


# --------------------------------------------------------------------------------------------
# 2. Visible-patch masking
# --------------------------------------------------------------------------------------------

@settings(max_examples=50)
@given(batch=st.integers(1, 6), n=st.integers(1, 80), data=st.data())
def test_random_masking_indices_are_unique_and_in_range(batch, n, data):
    keep = data.draw(st.integers(1, n))
    ids = random_masking(batch, n, keep)
    assert ids.shape == (batch, keep) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < n
    assert all(len(set(row.tolist())) == keep for row in ids)


@settings(max_examples=30)
@given(batch=st.integers(2, 6), n=st.integers(24, 100), data=st.data())
def test_random_masking_rows_differ_across_samples_and_are_not_sorted(batch, n, data):
    # keep >= 12 makes a sorted row (1/12! ~ 2e-9) or two equal rows astronomically unlikely.
    keep = data.draw(st.integers(12, n))
    ids = random_masking(batch, n, keep)
    rows = {tuple(r) for r in ids.tolist()}
    assert len(rows) == batch
    for row in ids:
        assert not torch.equal(row, row.sort().values)


def test_random_masking_keeps_every_index_equally_often():
    # Each of n indices should be kept with probability keep/n; 4000 draws put a biased subset
    # (e.g. always the first `keep`) many standard deviations away.
    n, keep, draws = 16, 4, 4000
    ids = random_masking(draws, n, keep, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids.flatten(), minlength=n).float() / draws
    torch.testing.assert_close(freq, torch.full((n,), keep / n), atol=0.03, rtol=0)


def test_random_masking_is_reproducible_with_a_generator():
    a = random_masking(3, 50, 20, generator=torch.Generator().manual_seed(7))
    b = random_masking(3, 50, 20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 3. Position dropping
# --------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(batch=st.integers(1, 6), n_vis=st.integers(1, 60), data=st.data())
def test_drop_positions_drops_exactly_n_vis_minus_n_keep_per_row(batch, n_vis, data):
    n_keep = data.draw(st.integers(0, n_vis - 1))
    dropped = drop_positions(batch, n_vis, n_keep)
    assert dropped.shape == (batch, n_vis) and dropped.dtype == torch.bool
    assert (dropped.sum(1) == n_vis - n_keep).all()


def test_drop_positions_differ_across_samples():
    dropped = drop_positions(8, 64, 32)
    assert len({tuple(r) for r in dropped.tolist()}) == 8


@settings(max_examples=10)
@given(mask_ratio=st.sampled_from([0.0, 0.5, 0.75]),
       pos_mask_ratio=st.sampled_from([0.25, 0.75, 1.0]),
       pos_embed=st.sampled_from(["sincos", "learnable"]), seed=st.integers(0, 2**16))
def test_visible_token_is_its_patch_embedding_plus_true_position_or_mask_token(
        mask_ratio, pos_mask_ratio, pos_embed, seed):
    # Ties ids_keep to the content: token t is built from patch ids_keep[t], and carries that
    # patch's own position embedding unless dropped, in which case it carries [MASK] only.
    torch.manual_seed(seed)
    model = tiny_model(16, 4, mask_ratio=mask_ratio, pos_mask_ratio=pos_mask_ratio,
                       pos_embed=pos_embed)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens, ids, dropped = model.embed_visible(imgs)
        enc = model.encoder
        content = enc.patch_embed(patchify(imgs, 4))                  # (B, N, D)
        for b in range(3):
            for t in range(ids.shape[1]):
                k = ids[b, t].item()
                pos = model.mask_pos_token[0, 0] if dropped[b, t] else enc.pos_embed[0, 1 + k]
                torch.testing.assert_close(tokens[b, t], content[b, k] + pos,
                                           atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 4. ViT encoder
# --------------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(quarter=st.integers(1, 8), h=st.integers(1, 6), w=st.integers(1, 6))
def test_sincos_pos_embed_matches_mae_formula_column_first(quarter, h, w):
    D = 4 * quarter
    emb = sincos_pos_embed(D, (h, w))
    assert emb.shape == (h * w, D)
    expected = torch.empty(h * w, D, dtype=torch.float64)
    for k in range(h * w):
        r, c = k // w, k % w
        for i in range(quarter):
            omega = 10000.0 ** (-i / quarter)
            expected[k, i] = math.sin(c * omega)
            expected[k, quarter + i] = math.cos(c * omega)
            expected[k, 2 * quarter + i] = math.sin(r * omega)
            expected[k, 3 * quarter + i] = math.cos(r * omega)
    torch.testing.assert_close(emb.double(), expected, atol=1e-6, rtol=0)


def test_sincos_pos_embed_rejects_width_not_multiple_of_four():
    with pytest.raises(ValueError, match="dim"):
        sincos_pos_embed(30, (2, 2))


def test_sincos_encoder_has_fixed_embedding_with_zero_cls_row_and_learnable_option_trains():
    fixed = ViT((8, 12), 4, dim=16, depth=1, heads=2, pos_embed="sincos")
    assert not fixed.pos_embed.requires_grad
    assert fixed.pos_embed.shape == (1, 1 + 6, 16)
    assert torch.equal(fixed.pos_embed[0, 0], torch.zeros(16))
    torch.testing.assert_close(fixed.pos_embed[0, 1:], sincos_pos_embed(16, (2, 3)))
    learn = ViT((8, 12), 4, dim=16, depth=1, heads=2, pos_embed="learnable")
    assert learn.pos_embed.requires_grad


@settings(max_examples=10)
@given(h=st.integers(1, 4), w=st.integers(1, 4), p=st.sampled_from([2, 4]),
       B=st.integers(1, 3))
def test_forward_features_returns_cls_plus_every_patch(h, w, p, B):
    enc = ViT((h * p, w * p), p, dim=16, depth=1, heads=2)
    assert enc.forward_features(torch.randn(B, 3, h * p, w * p)).shape == (B, 1 + h * w, 16)


@settings(max_examples=10)
@given(B=st.integers(1, 3), heads=st.integers(1, 4), n=st.integers(1, 70),
       d=st.sampled_from([8, 32, 64]))
def test_cpu_attention_equals_sdpa_in_fp64_values_and_gradients(B, heads, n, d):
    # The CPU's two matmuls and SDPA (the GPU's path) are the same function: equal in fp64, and so
    # are the gradients they send back to q, k and v.
    torch.manual_seed(0)
    qkv = torch.randn(3, B, heads, n, d, dtype=torch.float64, requires_grad=True)
    ours = droppos.attention(*qkv)
    grad_ours, = torch.autograd.grad(ours.pow(2).sum(), qkv)
    ref = F.scaled_dot_product_attention(*qkv)
    grad_ref, = torch.autograd.grad(ref.pow(2).sum(), qkv)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-12, rtol=1e-12)


def test_cpu_attention_under_bf16_autocast_is_sdpa_within_bf16_rounding():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 3, 65, 64)
    with torch.autocast("cpu", torch.bfloat16):
        ours = droppos.attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(ours.double(), ref, atol=3e-2, rtol=2e-2)


def test_cls_token_carries_its_own_position_embedding():
    # Row 0 of pos_embed belongs to [CLS] (timm's layout); it is zero when fixed, so only a
    # learnable embedding shows whether the encoder really adds it.
    torch.manual_seed(0)
    enc = ViT(8, 4, dim=16, depth=1, heads=2, pos_embed="learnable").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = enc.forward_features(x)
        enc.pos_embed[0, 0].normal_(std=1.0)
        after = enc.forward_features(x)
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-3


def test_encoder_state_dict_loads_into_timm_with_identical_features():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    for img_size, p, pos_embed in [((16, 24), 4, "sincos"), (16, 2, "learnable")]:
        ours = ViT(img_size, p, dim=32, depth=2, heads=2, pos_embed=pos_embed).eval()
        # Perturb every tensor, so zero-initialised biases and unit norms are checked too.
        with torch.no_grad():
            for t in ours.state_dict().values():
                t.add_(0.05 * torch.randn_like(t))
        ref = VisionTransformer(img_size=img_size, patch_size=p, embed_dim=32, depth=2,
                                num_heads=2, qkv_bias=True, class_token=True, global_pool="",
                                num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 3, *((img_size,) * 2 if isinstance(img_size, int) else img_size))
        with torch.no_grad():
            torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x),
                                       atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. Decoder
# --------------------------------------------------------------------------------------------

@settings(max_examples=10)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_decoder_is_permutation_equivariant_over_visible_tokens(n, seed):
    # No position embedding and no mask tokens: shuffling the tokens shuffles the logits.
    torch.manual_seed(seed)
    dec = Decoder(dim=32, decoder_dim=16, depth=2, heads=2, num_patches=20).eval()
    latent = torch.randn(2, 1 + n, 32)
    perm = torch.randperm(n)
    shuffled = torch.cat([latent[:, :1], latent[:, 1:][:, perm]], dim=1)
    with torch.no_grad():
        out, out_shuffled = dec(latent), dec(shuffled)
    assert out.shape == (2, n, 20)
    torch.testing.assert_close(out_shuffled, out[:, perm], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. Position smoothing
# --------------------------------------------------------------------------------------------

grids = st.tuples(st.integers(1, 7), st.integers(1, 7))
sigmas = st.floats(0.3, 5.0)


@settings(max_examples=40)
@given(grid=grids, sigma=st.one_of(st.just(0.0), sigmas))
def test_targets_rows_sum_to_one(grid, sigma):
    t = gaussian_position_targets(grid, sigma)
    N = grid[0] * grid[1]
    assert t.shape == (N, N)
    assert (t >= 0).all()
    torch.testing.assert_close(t.sum(1), torch.ones(N), atol=1e-5, rtol=0)


@settings(max_examples=40)
@given(grid=grids, sigma=st.one_of(st.just(0.0), sigmas))
def test_targets_peak_on_the_diagonal(grid, sigma):
    t = gaussian_position_targets(grid, sigma)
    diag = t.diagonal()
    off = t.masked_fill(torch.eye(len(t), dtype=torch.bool), -1.0)
    assert (diag[:, None] > off).all()


@settings(max_examples=20)
@given(grid=grids)
def test_targets_are_one_hot_at_sigma_zero(grid):
    N = grid[0] * grid[1]
    assert torch.equal(gaussian_position_targets(grid, 0.0), torch.eye(N))


@settings(max_examples=40)
@given(grid=grids, sigma=sigmas)
def test_targets_are_a_symmetric_gaussian_kernel_before_row_normalisation(grid, sigma):
    # With row normalisation t_ij = K_ij / s_i and K_ii = exp(0) = 1, so K_ij = t_ij / t_ii:
    # rebuild the kernel and check it is symmetric and exactly exp(-|g_i - g_j|^2 / sigma^2).
    t = gaussian_position_targets(grid, sigma).double()
    kernel = t / t.diagonal()[:, None]
    torch.testing.assert_close(kernel, kernel.T, atol=1e-6, rtol=1e-5)
    g = grid_coords(*grid)
    d2 = ((g[:, None] - g[None]) ** 2).sum(-1)
    torch.testing.assert_close(kernel, torch.exp(-d2 / sigma ** 2), atol=1e-6, rtol=1e-4)


def entropy(t):
    return -(t * t.clamp_min(1e-30).log()).sum(-1)


@settings(max_examples=40)
@given(grid=grids.filter(lambda g: g[0] * g[1] > 1), s1=sigmas, factor=st.floats(1.1, 3.0))
def test_targets_widen_as_sigma_grows(grid, s1, factor):
    narrow = gaussian_position_targets(grid, s1)
    wide = gaussian_position_targets(grid, s1 * factor)
    assert (wide.diagonal() < narrow.diagonal()).all()
    assert (entropy(wide) > entropy(narrow)).all()
    one_hot = gaussian_position_targets(grid, 0.0)
    assert (entropy(narrow) > entropy(one_hot)).all()


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 7)])
def test_targets_border_rows_sum_to_one_unlike_column_normalisation(grid):
    # The official code divides by column sums; at the border that row no longer sums to 1.
    h, w = grid
    corners = [0, w - 1, (h - 1) * w, h * w - 1]
    t = gaussian_position_targets(grid, 1.0)
    torch.testing.assert_close(t[corners].sum(1), torch.ones(4), atol=1e-6, rtol=0)
    g = grid_coords(h, w)
    kernel = torch.exp(-((g[:, None] - g[None]) ** 2).sum(-1))
    official = kernel / kernel.sum(0, keepdim=True)
    assert ((official[corners].sum(1) - 1).abs() > 1e-3).all()


@settings(max_examples=40)
@given(sigma0=st.floats(0.0, 5.0), progress=st.floats(-1.0, 2.0))
def test_sigma_decays_linearly_from_sigma0_to_zero(sigma0, progress):
    clamped = min(max(progress, 0.0), 1.0)
    assert sigma_at(sigma0, progress) == pytest.approx(sigma0 * (1 - clamped))
    assert sigma_at(sigma0, 0.0) == sigma0 and sigma_at(sigma0, 1.0) == 0.0
    assert sigma_at(sigma0, progress, decay=False) == sigma0


# --------------------------------------------------------------------------------------------
# 7. Attentive reconstruction
# --------------------------------------------------------------------------------------------

@settings(max_examples=10)
@given(mask_ratio=st.sampled_from([0.0, 0.5, 0.75, 0.9]), tau=st.sampled_from([0.05, 0.1, 1.0]),
       seed=st.integers(0, 2**16))
def test_attentive_weights_sum_to_one_per_image_are_nonnegative_and_carry_no_gradient(
        mask_ratio, tau, seed):
    torch.manual_seed(seed)
    enc = ViT(16, 4, dim=32, depth=1, heads=2, pos_embed="learnable")
    imgs = torch.randn(3, 3, 16, 16, requires_grad=True)
    ids = random_masking(3, 16, n_visible(16, mask_ratio))
    w = attentive_weights(enc, imgs, ids, tau)
    assert w.shape == ids.shape
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    assert not w.requires_grad and w.grad_fn is None


def test_attentive_weights_are_cls_cosine_softmax_over_all_patches_renormalised():
    torch.manual_seed(0)
    enc = ViT(16, 4, dim=32, depth=1, heads=2)
    imgs = torch.randn(2, 3, 16, 16)
    ids = random_masking(2, 16, 6)
    with torch.no_grad():
        f = enc.forward_features(imgs)
    cos = F.normalize(f[:, 1:], dim=-1) @ F.normalize(f[:, 0], dim=-1).unsqueeze(-1)
    full = torch.softmax(cos.squeeze(-1) / 0.1, dim=-1)               # over all N patches
    kept = full.gather(1, ids)
    torch.testing.assert_close(attentive_weights(enc, imgs, ids, 0.1),
                               kept / kept.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tau", [3e-3, 1e-20, 5e-324])
def test_attentive_weights_stay_finite_and_tend_to_one_hot_as_tau_goes_to_zero(tau):
    # Renormalising a softmax over all N patches gives 0 / 0 once every visible weight underflows.
    torch.manual_seed(0)
    enc = ViT(32, 4, dim=32, depth=2, heads=2)
    imgs, ids = torch.randn(16, 3, 32, 32), random_masking(16, 64, 16)
    w = attentive_weights(enc, imgs, ids, tau)
    torch.testing.assert_close(w.sum(1), torch.ones(16), atol=1e-5, rtol=0)
    if tau < 1e-10:  # all the weight on the patch most similar to [CLS]
        with torch.no_grad():
            f = enc.forward_features(imgs)
        cos = F.cosine_similarity(f[:, :1], f[:, 1:], dim=-1).gather(1, ids)
        assert torch.equal(w, F.one_hot(cos.argmax(1), 16).float())


def test_attentive_weights_of_a_large_batch_equal_those_of_each_image_alone():
    # On a CPU the full-image pass runs in chunks of ~4k tokens: 300 images of 17 tokens make
    # two chunks, and no image's weights may depend on which chunk it fell in.
    torch.manual_seed(0)
    enc = ViT(8, 2, dim=16, depth=1, heads=2)
    imgs = torch.randn(300, 3, 8, 8)
    ids = random_masking(300, 16, 5)
    alone = torch.cat([attentive_weights(enc, imgs[i:i + 1], ids[i:i + 1], 0.1) for i in range(300)])
    torch.testing.assert_close(attentive_weights(enc, imgs, ids, 0.1), alone, atol=1e-6, rtol=1e-5)


def test_model_step_traces_under_torch_compile():
    # `--compile` hands the whole model to torch.compile; an inference-mode tensor in the
    # attentive pass once broke its backward. aot_eager traces forward and backward as inductor
    # does, without generating code, so this stays fast.
    torch.manual_seed(0)
    model = tiny_model(8, 2)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(torch.randn(4, 3, 8, 8), 0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.mask_pos_token.grad is not None


# --------------------------------------------------------------------------------------------
# 8. Loss
# --------------------------------------------------------------------------------------------

@st.composite
def loss_inputs(draw, min_sigma=0.0, max_grid=5, scale=10.0):
    """Random logits (B, n, N), the targets of random true positions, and a dropped mask with at
    least one True per batch, as the model would hand them to position_loss."""
    h, w = draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))
    N = h * w
    B, n = draw(st.integers(1, 3)), draw(st.integers(1, N))
    sigma = draw(st.one_of(st.just(0.0), st.floats(max(min_sigma, 0.3), 3.0))
                 if min_sigma == 0 else st.floats(min_sigma, 3.0))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = scale * torch.randn(B, n, N, generator=gen, dtype=torch.float64).float()
    ids = random_masking(B, N, n, generator=gen)
    dropped = torch.rand(B, n, generator=gen) < 0.6
    dropped[0, 0] = True
    targets = gaussian_position_targets((h, w), sigma)[ids]
    return logits, targets, dropped, ids, sigma


@settings(max_examples=60)
@given(inp=loss_inputs(scale=100.0), use_weights=st.booleans())
def test_loss_is_finite_and_at_least_the_target_entropy(inp, use_weights):
    # CE(t, q) = H(t) + KL(t || q) >= H(t), and a weighted mean keeps the inequality.
    logits, targets, dropped, _, _ = inp
    weights = torch.rand(dropped.shape) + 0.1 if use_weights else None
    loss = position_loss(logits, targets, dropped, weights)
    assert loss.shape == () and torch.isfinite(loss)
    w = dropped.float() * (weights if use_weights else 1.0)
    mean_entropy = (w * entropy(targets)).sum() / w.sum()
    assert loss >= mean_entropy - 1e-4


@settings(max_examples=40)
@given(inp=loss_inputs())
def test_loss_equals_cross_entropy_at_sigma_zero_with_uniform_weights(inp):
    logits, _, dropped, ids, _ = inp
    N = logits.shape[-1]
    one_hot = gaussian_position_targets((1, N), 0.0)[ids]
    expected = F.cross_entropy(logits[dropped], ids[dropped])
    torch.testing.assert_close(position_loss(logits, one_hot, dropped), expected,
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=40)
@given(inp=loss_inputs(min_sigma=1.0), a1=st.floats(0.0, 1.0), a2=st.floats(0.0, 1.0))
def test_loss_decreases_as_logits_move_toward_the_targets(inp, a1, a2):
    # CE is convex in the logits and minimised at log(targets), so along the straight line from
    # any logits to log(targets) it can only go down.
    logits, targets, dropped, _, _ = inp
    assume(abs(a1 - a2) > 1e-3)
    a1, a2 = min(a1, a2), max(a1, a2)
    goal = targets.double().log().float()   # sigma >= 1 on grids <= 5x5: no zero target
    move = lambda a: (1 - a) * logits + a * goal
    l1 = position_loss(move(a1), targets, dropped)
    l2 = position_loss(move(a2), targets, dropped)
    assert l2 <= l1 + 1e-5
    if logits.shape[-1] > 1:  # with one position every prediction is already perfect
        assert position_loss(goal, targets, dropped) < position_loss(logits, targets, dropped)


@settings(max_examples=40)
@given(inp=loss_inputs(), use_weights=st.booleans(), seed=st.integers(0, 2**16))
def test_loss_ignores_tokens_whose_position_was_kept(inp, use_weights, seed):
    logits, targets, dropped, _, _ = inp
    weights = torch.rand(dropped.shape) + 0.1 if use_weights else None
    noise = 50 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    changed = torch.where(dropped.unsqueeze(-1), logits, logits + noise)
    assert torch.equal(position_loss(logits, targets, dropped, weights),
                       position_loss(changed, targets, dropped, weights))


@settings(max_examples=40)
@given(inp=loss_inputs(), seed=st.integers(0, 2**16))
def test_loss_is_the_weighted_mean_of_per_token_cross_entropy_over_dropped_tokens(inp, seed):
    logits, targets, dropped, _, _ = inp
    weights = torch.rand(dropped.shape, generator=torch.Generator().manual_seed(seed)) + 0.01
    ce = -(targets * F.log_softmax(logits, -1)).sum(-1)
    w = weights * dropped
    torch.testing.assert_close(position_loss(logits, targets, dropped, weights),
                               (w * ce).sum() / w.sum(), atol=1e-5, rtol=1e-5)
    # Uniform weights are the plain mean over dropped tokens.
    torch.testing.assert_close(position_loss(logits, targets, dropped), ce[dropped].mean(),
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 9. Metric
# --------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(inp=loss_inputs(scale=1.0), hits=st.integers(0, 2**16))
def test_accuracy_is_unweighted_argmax_hit_rate_over_dropped_tokens(inp, hits):
    logits, _, dropped, ids, _ = inp
    # A random subset of tokens is made to predict its true position, the rest anything else
    # (with a single position, every token is right).
    gen = torch.Generator().manual_seed(hits)
    force = (torch.rand(dropped.shape, generator=gen) < 0.5) | (logits.shape[-1] == 1)
    push = torch.where(force, 1e3, -1e3).unsqueeze(-1)
    logits = logits.scatter_add(-1, ids.unsqueeze(-1), push)
    expected = (force & dropped).sum().item() / dropped.sum().item()
    acc = position_accuracy(logits, ids, dropped)
    assert acc.shape == ()
    assert acc.item() == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@st.composite
def model_configs(draw):
    """A valid (img_size, patch_size, mask_ratio, pos_mask_ratio), non-square grids included."""
    p = draw(st.sampled_from([1, 2, 4]))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    N = h * w
    mask_ratio = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.95)))
    assume(n_visible(N, mask_ratio) >= 1)
    n_vis = n_visible(N, mask_ratio)
    pos_mask_ratio = draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0)))
    assume(n_dropped(n_vis, pos_mask_ratio) >= 1)
    img = (h * p, w * p) if draw(st.booleans()) or h != w else h * p
    return img, p, mask_ratio, pos_mask_ratio


@settings(max_examples=15)
@given(cfg=model_configs(), B=st.integers(1, 3), attentive=st.booleans(),
       sigma=st.sampled_from([0.0, 0.5, 1.0]))
def test_model_output_shapes_and_counts(cfg, B, attentive, sigma):
    img, p, mask_ratio, pos_mask_ratio = cfg
    H, W = img if isinstance(img, tuple) else (img, img)
    N = (H // p) * (W // p)
    n_vis = n_visible(N, mask_ratio)
    model = tiny_model(img, p, mask_ratio=mask_ratio, pos_mask_ratio=pos_mask_ratio,
                       attentive=attentive)
    out = model(torch.randn(B, 3, H, W), sigma)
    assert out.logits.shape == (B, n_vis, N)
    assert out.ids_keep.shape == (B, n_vis) and out.ids_keep.dtype == torch.long
    assert out.dropped.shape == (B, n_vis) and out.dropped.dtype == torch.bool
    assert (out.dropped.sum(1) == n_dropped(n_vis, pos_mask_ratio)).all()
    assert all(len(set(r)) == n_vis for r in out.ids_keep.tolist())
    assert out.ids_keep.min() >= 0 and out.ids_keep.max() < N
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.acc.shape == () and 0 <= out.acc <= 1


@settings(max_examples=10)
@given(attentive=st.booleans(), sigma=st.sampled_from([0.0, 0.7, 1.0]),
       pos_embed=st.sampled_from(["sincos", "learnable"]), seed=st.integers(0, 2**16))
def test_model_loss_and_accuracy_follow_from_its_own_outputs(attentive, sigma, pos_embed, seed):
    # Recomputes steps 6-9 from the returned logits / ids_keep / dropped: the targets must be
    # those of the tokens' true positions and the weights those of step 7.
    torch.manual_seed(seed)
    model = tiny_model(16, 4, mask_ratio=0.5, attentive=attentive, pos_embed=pos_embed)
    imgs = torch.randn(3, 3, 16, 16)
    out = model(imgs, sigma)
    targets = gaussian_position_targets((4, 4), sigma)[out.ids_keep]
    weights = attentive_weights(model.encoder, imgs, out.ids_keep, 0.1) if attentive else None
    torch.testing.assert_close(out.loss, position_loss(out.logits, targets, out.dropped, weights))
    assert torch.equal(out.acc, position_accuracy(out.logits, out.ids_keep, out.dropped))


def test_model_encodes_visible_patches_in_random_order_different_per_sample():
    # Raster order would be a position leak waiting to happen (anything order-sensitive could
    # read it); the method asks for random order, independently per image.
    model = tiny_model(16, 2, mask_ratio=0.5, attentive=False)       # N = 64, n_vis = 32
    with torch.no_grad():
        out = model(torch.randn(4, 3, 16, 16), 0.0)
    for row in out.ids_keep:
        assert not torch.equal(row, row.sort().values)
    assert len({tuple(r) for r in out.ids_keep.tolist()}) == 4
    assert len({tuple(r) for r in out.dropped.tolist()}) == 4
    # With nothing masked every position is present, still shuffled.
    full = tiny_model(16, 2, mask_ratio=0.0, attentive=False)
    with torch.no_grad():
        ids = full(torch.randn(2, 3, 16, 16), 0.0).ids_keep
    assert torch.equal(ids.sort(1).values, torch.arange(64).expand(2, -1))
    assert not torch.equal(ids[0], torch.arange(64))


def logits_by_position(out):
    """(B, N, N): the logits of the token that came from patch k, whatever order it was in."""
    B, n, N = out.logits.shape
    keyed = torch.empty(B, N, N)
    return keyed.scatter(1, out.ids_keep.unsqueeze(-1).expand(-1, -1, N), out.logits)


@settings(max_examples=10)
@given(h=st.integers(1, 4), w=st.integers(2, 4), pos_embed=st.sampled_from(["sincos", "learnable"]),
       seed=st.integers(0, 2**16))
def test_no_leak_each_patchs_logits_move_with_the_patch(h, w, pos_embed, seed):
    # Every position dropped, nothing masked: the only thing the network sees of a patch is its
    # content, so moving patches around the image must move their logits with them.
    torch.manual_seed(seed)
    p = 2
    model = tiny_model((h * p, w * p), p, mask_ratio=0.0, pos_mask_ratio=1.0,
                       attentive=False, pos_embed=pos_embed).eval()
    x = torch.randn(2, 3, h * p, w * p)
    perm = torch.randperm(h * w)
    moved = unpatchify(patchify(x, p)[:, perm], p, (h, w))          # new slot j holds perm[j]
    with torch.no_grad():
        a = logits_by_position(model(x, 0.0))
        b = logits_by_position(model(moved, 0.0))
    torch.testing.assert_close(b, a[:, perm], atol=1e-4, rtol=1e-4)


@settings(max_examples=10)
@given(mask_ratio=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16))
def test_dropped_tokens_do_not_receive_their_true_position_embedding(mask_ratio, seed):
    # Every position dropped: replacing the patch rows of the position embedding by anything
    # must not change a single logit (same random draws both times).
    torch.manual_seed(seed)
    model = tiny_model(16, 4, mask_ratio=mask_ratio, pos_mask_ratio=1.0, attentive=False,
                       pos_embed="learnable")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        before = model(x, 0.0)
        model.encoder.pos_embed[0, 1:].normal_(std=1.0)
        torch.manual_seed(seed + 1)
        after = model(x, 0.0)
    assert torch.equal(before.ids_keep, after.ids_keep)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-6, rtol=1e-6)


def test_kept_positions_do_reach_the_encoder():
    # Counterpart of the test above: when some positions are kept, the embedding matters.
    torch.manual_seed(0)
    model = tiny_model(16, 4, mask_ratio=0.0, pos_mask_ratio=0.5, attentive=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        before = model(x, 0.0).logits
        model.encoder.pos_embed[0, 1:].normal_(std=1.0)
        torch.manual_seed(1)
        after = model(x, 0.0).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("pos_embed", ["sincos", "learnable"])
@pytest.mark.parametrize("attentive", [True, False])
def test_gradients_reach_every_trainable_parameter(pos_embed, attentive):
    torch.manual_seed(0)
    # N = 16, n_vis = 8, 2 positions kept: both the [MASK] token and true positions are used.
    model = tiny_model(8, 2, mask_ratio=0.5, pos_mask_ratio=0.75, attentive=attentive,
                       pos_embed=pos_embed)
    model(torch.randn(4, 3, 8, 8), 1.0).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "mask_pos_token" in trainable
    assert ("encoder.pos_embed" in trainable) == (pos_embed == "learnable")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_bf16_autocast_forward_and_backward_give_a_finite_loss():
    # Deliberately minute: bf16 matmuls are very slow on CPUs without native bf16 support.
    torch.manual_seed(0)
    model = DropPos(8, 4, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                    decoder_heads=2, mask_ratio=0.0, pos_mask_ratio=0.75)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8), 1.0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.mask_pos_token.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_runs_bf16_without_host_synchronisation():
    # A step that waits on the host leaves the GPU idle; sync debug mode turns any wait
    # (.item(), a blocking copy, data-dependent shapes) into an error.
    torch.manual_seed(0)
    model = tiny_model(32, 4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    imgs = torch.randn(8, 3, 32, 32, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(imgs, 0.5)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss).item()


@contextmanager
def one_thread():
    # Thousands of tiny ops: a second OpenMP thread gains nothing, and when other processes
    # share the cores its spin-waiting made these tests ~30x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with patch.dict(os.environ, OMP_NUM_THREADS="1"):  # which train.py's thread rule keeps
            yield
    finally:
        torch.set_num_threads(before)


@one_thread()
def learning_curve(model, make_batch, steps, every, eval_batches=16, bf16=False):
    """AdamW for `steps` fresh batches at sigma = 0; the mean eval-mode accuracy after every
    `every` steps. bf16: forward under bf16 autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16)
    curve = []
    for step in range(1, steps + 1):
        model.train()
        with precision():
            loss = model(make_batch(), 0.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            model.eval()
            with torch.no_grad(), precision():
                acc = torch.stack([model(make_batch(), 0.0).acc for _ in range(eval_batches)])
            curve.append(acc.float().mean().item())
    return curve


def train_then_measure(model, make_batch, steps, eval_batches=16):
    """AdamW for `steps` fresh batches at sigma = 0, then the mean eval-mode accuracy."""
    return learning_curve(model, make_batch, steps, steps, eval_batches)[-1]


def test_position_accuracy_stays_at_chance_on_pure_noise():
    # Fresh noise every step: the content says nothing about where a patch was, so anything
    # above chance is a leak. With nothing masked each position occurs once per image, so even
    # a constant guess scores exactly 1/N; 16 x 32 x 16 = 8192 scored tokens make +-0.03 ~4 s.d.
    torch.manual_seed(0)
    model = tiny_model(8, 2, mask_ratio=0.0, pos_mask_ratio=1.0, attentive=False)
    acc = train_then_measure(model, lambda: torch.randn(32, 3, 8, 8), steps=200)
    assert abs(acc - 1 / 16) < 0.03


def colour_coded_batch(generator=None):
    """Red = row, green = column (plus fresh noise): the content alone reveals where a patch was.
    -> (32, 3, 8, 8), patch 2, a 4×4 grid."""
    ramp = torch.arange(4.0) / 3
    colour = torch.stack([ramp[:, None].expand(4, 4), ramp[None, :].expand(4, 4),
                          torch.full((4, 4), 0.5)])                      # (3, h, w), one per cell
    clean = colour.repeat_interleave(2, 1).repeat_interleave(2, 2)      # (3, 8, 8)
    return clean + 0.05 * torch.randn(32, 3, 8, 8, generator=generator)


def test_position_accuracy_nears_one_when_patch_colours_encode_position():
    # A working pipeline must learn positions that the colours give away. Attentive weighting is
    # off because it concentrates the loss on a few patches per image, which slows learning the
    # rest of the grid.
    torch.manual_seed(0)
    model = tiny_model(8, 2, mask_ratio=0.5, pos_mask_ratio=0.75, attentive=False)
    acc = train_then_measure(model, colour_coded_batch, steps=200)
    assert acc >= 0.9


def test_bf16_autocast_learns_positions_along_the_same_curve_as_fp32():
    # The same model, batches and optimiser in both precisions; position accuracy is measured
    # every 25 steps. bf16 matmuls round to 8 bits of mantissa, so the curves may differ a
    # little, but not in trend. (Measured: 0.38 0.60 0.76 0.95 1.0 ... in both.)
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = tiny_model(8, 2, mask_ratio=0.5, pos_mask_ratio=0.75, attentive=False)
        gen = torch.Generator().manual_seed(1)
        curves[precision] = learning_curve(model, lambda: colour_coded_batch(gen), steps=200, every=25,
                                           eval_batches=8, bf16=precision == "bf16")
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[0] < 0.7 and fp32[-1] >= 0.9 and bf16[-1] >= 0.9, curves
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1, curves


# ===== train.py =====
# Tests of train.py, the command-line program, in the order of its sections. A tiny ViT on the
# offline synthetic set, fp32, one thread, no loader processes, so an epoch takes well under a
# second. In-process `train.main([...])` wherever that is enough; subprocesses only where the
# process boundary is the point (SIGKILL, Ctrl-C, torchrun, what a terminal shows). Tests that run
# train.py end to end are marked slow: `pytest -m "not slow"` leaves them out.

TRAIN_DIR = Path(train.__file__).resolve().parent
# 256 images / batch 16 = 16 steps per epoch: enough steps that a run can be interrupted
# mid-epoch reliably, few enough that 3 epochs take a few seconds.
TRAIN_STEPS_PER_EPOCH = 16
TRAIN_TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "16",
              "--dim", "32", "--depth", "2", "--heads", "2",
              "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
              "--knn-every", "0", "--precision", "fp32", "--workers", "0", "--device", "cpu",
              "--log-every", "0"]  # a progress line and a metrics.jsonl line for every step
# Fine-tuning from a checkpoint: no size flags, the encoder comes from the checkpoint.
ENCODER_TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "16", "--precision", "fp32",
                "--workers", "0", "--device", "cpu", "--log-every", "0"]
SYNTH = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--dim", "32", "--depth", "2",
         "--heads", "2", "--epochs", "1", "--precision", "fp32", "--device", "cpu", "--workers", "0"]
CPU = train.Proc(0, 1, 0, torch.device("cpu"), "fp32")
SCRATCH_TINY = ENCODER_TINY + ["--dim", "32", "--depth", "2", "--heads", "2"]
TRAIN_EPOCHS = 3
SUBPROCESS_TIMEOUT = 300  # seconds; generous because the cores are shared with other work
slow = pytest.mark.slow


def _train_in_process(argv):
    """train.main(argv) in this process; returns what it printed on stdout."""
    out = StringIO()
    # One thread, as the subprocesses (OMP_NUM_THREADS=1): the exact-resume tests compare
    # weights bit for bit across the two.
    with one_thread(), redirect_stdout(out):
        train.main([str(a) for a in argv])
    return out.getvalue()


def _fails(argv, capsys):
    """The one error line of a run that must be refused (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
        _train_in_process(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _train_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _start_train(argv, log_dir, torchrun=False, **env):
    """train.py as its own process (under torchrun with 2 processes if asked); stdout and stderr
    go to files (a pipe nobody reads could fill up and block it)."""
    out, err = open(log_dir / "stdout.txt", "w"), open(log_dir / "stderr.txt", "w")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] if torchrun else [sys.executable]
    proc = subprocess.Popen([*launcher, "train.py", *map(str, argv)], cwd=TRAIN_DIR,
                            env=_train_env(**env), stdout=out, stderr=err)
    out.close()
    err.close()
    return proc


def _wait(proc, timeout=SUBPROCESS_TIMEOUT):
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_train_cli(argv, log_dir, torchrun=False, **env):
    """train.py run to its end: (exit code, stdout, stderr)."""
    proc = _start_train(argv, log_dir, torchrun, **env)
    _wait(proc)
    return proc.returncode, (log_dir / "stdout.txt").read_text(), (log_dir / "stderr.txt").read_text()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _wait_for_step_of_epoch(proc, metrics_path, epoch, timeout=SUBPROCESS_TIMEOUT):
    """Poll metrics.jsonl until a step line of `epoch` (counted from 1) is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before a step of epoch {epoch} was logged")
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line being written right now
                    continue
                if rec.get("epoch") == epoch and not rec.get("summary"):
                    return
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    pytest.fail(f"no step of epoch {epoch} logged within {timeout} s")


def _assert_same_training_state(ckpt_a, ckpt_b):
    """Model weights bit for bit equal, and the optimiser moments with them."""
    a, b = torch.load(ckpt_a, weights_only=True), torch.load(ckpt_b, weights_only=True)
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimiser state {i}.{k} differs"


def _learned_rows(path):
    """metrics.jsonl without the fields that measure the machine rather than the run."""
    return [{k: v for k, v in r.items() if k not in ("images_per_sec", "elapsed_s")} for r in _metrics(path)]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """One uninterrupted 3-epoch pre-training run: the reference for the resume tests, and the
    checkpoint that the fine-tuning and bad-checkpoint tests start from."""
    out_dir = tmp_path_factory.mktemp("pretrain") / "run"
    stdout = _train_in_process(TRAIN_TINY + ["--epochs", TRAIN_EPOCHS, "--output-dir", out_dir])
    return out_dir, stdout


@pytest.fixture
def run_copy(pretrained_run, tmp_path):
    """A copy of the finished reference run that a test may resume or damage."""
    copy = tmp_path / "copy"
    shutil.copytree(pretrained_run[0], copy)
    return copy


# --------------------------------------------------------------------------------------------
# 1. The loop: a whole run, interruptions, a bad loss
# --------------------------------------------------------------------------------------------

@slow
def test_pretraining_run_writes_metrics_checkpoint_timm_encoder_and_picture(pretrained_run):
    out_dir, stdout = pretrained_run
    assert {p.name for p in out_dir.iterdir()} == {"metrics.jsonl", "checkpoint.pt", "encoder.pt",
                                                   "reassembly.png", "curves.png", ".lock"}  # no temporary

    # metrics.jsonl: one JSON object per line; with --log-every 0 one line per step, and one
    # summary per epoch. Epochs count from 1, as on the console.
    records = _metrics(out_dir / "metrics.jsonl")
    steps = [r for r in records if not r.get("summary")]
    summaries = [r for r in records if r.get("summary")]
    assert [r["step"] for r in steps] == list(range(1, TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in steps] == [1 + i // TRAIN_STEPS_PER_EPOCH for i in range(len(steps))]
    assert [r["epoch"] for r in summaries] == list(range(1, TRAIN_EPOCHS + 1))
    for r in steps:  # accuracies in percent, as every accuracy in metrics.jsonl
        assert {"epoch", "loss", "pos_top1", "lr", "sigma", "images_per_sec"} <= r.keys()
        assert math.isfinite(r["loss"]) and 0 <= r["pos_top1"] <= 100 and r["lr"] > 0 and r["sigma"] >= 0
    for r in summaries:
        assert math.isfinite(r["loss"]) and 0 <= r["pos_top1"] <= 100
    # The percent the console shows for the last step, not a fraction of it.
    shown = float(re.findall(r"pos-acc (\d+\.\d+)%", stdout.split("== epoch 3/3")[0])[-1])
    assert f"{steps[-1]['pos_top1']:.2f}" == f"{shown:.2f}"
    sigmas = [r["sigma"] for r in steps]
    assert sigmas[0] == 1.0 and sigmas == sorted(sigmas, reverse=True)  # σ0 = 1 decays

    # The checkpoint is plain tensors and containers: loadable without unpickling code.
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["mode"] == "pretrain" and (ck["epoch"], ck["step_in_epoch"]) == (TRAIN_EPOCHS, 0)

    # encoder.pt carries timm's ViT names and shapes, so other tools can load it.
    enc = torch.load(out_dir / "encoder.pt", weights_only=True)
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    assert set(enc) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                        "norm.weight", "norm.bias"} | {f"blocks.{i}.{k}" for i in range(2) for k in block}
    assert enc["patch_embed.proj.weight"].shape == (32, 3, 4, 4)  # a Conv2d, as in timm
    assert enc["pos_embed"].shape == (1, 1 + 64, 32) and enc["cls_token"].shape == (1, 1, 32)
    assert enc["blocks.0.attn.qkv.weight"].shape == (96, 32)
    for k, v in enc.items():  # the same tensors as the checkpoint's encoder
        assert torch.equal(v, ck["model"][f"encoder.{k}"])

    # reassembly.png: a PNG of 8 held-out 32-px images, 4 rows, enlarged 4×.
    with Image.open(out_dir / "reassembly.png") as png:
        assert png.format == "PNG" and png.width >= 8 * 128 and png.height >= 4 * 128

    # A progress line a person can follow, with the time left.
    line = re.compile(r"epoch \d+/3 +step \d+/16 +loss \d+\.\d+ +pos-acc \d+\.\d+% +lr \d\.\d+e[-+]\d+ +"
                      r"σ \d\.\d+ +\d+ img/s +left \d+:\d\d:\d\d")
    assert len(line.findall(stdout)) == TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH


def _start_and_reach_second_epoch(tmp_path, torchrun=False, epochs=TRAIN_EPOCHS):
    """A subprocess run of the reference arguments, returned once it is inside epoch 2."""
    out_dir = tmp_path / "run"
    argv = TRAIN_TINY + ["--epochs", epochs, "--output-dir", out_dir]
    proc = _start_train(argv, tmp_path, torchrun)
    _wait_for_step_of_epoch(proc, out_dir / "metrics.jsonl", epoch=2)
    return proc, out_dir


@slow
def test_resume_after_sigkill_mid_epoch_reproduces_the_uninterrupted_run_and_its_metrics(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    proc, out_dir = _start_and_reach_second_epoch(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved at the kill
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # What survives is the intact end-of-epoch-1 checkpoint (written to a temporary, renamed).
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0)

    stdout = _train_in_process(["--resume", out_dir])  # the folder is the whole command
    assert "resumed" in stdout
    _assert_same_training_state(ref_dir / "checkpoint.pt", out_dir / "checkpoint.pt")
    # Rows written after the checkpoint were cut and redone: no duplicates, and the same rows
    # (epoch summaries included) as the uninterrupted run.
    assert _learned_rows(out_dir / "metrics.jsonl") == _learned_rows(ref_dir / "metrics.jsonl")
    # The wall time goes on from the first sitting's checkpoint instead of starting again at 0.
    elapsed = [r["elapsed_s"] for r in _metrics(out_dir / "metrics.jsonl") if r.get("summary")]
    assert elapsed == sorted(elapsed) and elapsed[1] > ck["elapsed_s"] >= elapsed[0] > 0


@slow
def test_ctrl_c_during_the_last_evaluation_ends_the_run_whole_and_by_that_signal(tmp_path, monkeypatch):
    evaluate = train.Pretraining.evaluate

    def interrupted(task, epochs_done=None):
        os.kill(os.getpid(), signal.SIGINT)  # the run's own handler only takes note
        return evaluate(task, epochs_done)
    monkeypatch.setattr(train.Pretraining, "evaluate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        _train_in_process(TRAIN_TINY + ["--epochs", 1, "--output-dir", tmp_path / "run"])
    assert exit_info.value.code == 128 + signal.SIGINT  # a shell loop of runs stops here
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1


@slow
def test_ctrl_c_mid_epoch_saves_then_dies_of_sigint_without_traceback_and_resume_is_exact(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    proc, out_dir = _start_and_reach_second_epoch(tmp_path)
    proc.send_signal(signal.SIGINT)
    _wait(proc)
    stderr = (tmp_path / "stderr.txt").read_text()
    # Killed by the signal it was sent (a shell's status 130), so a shell loop around it stops too.
    assert proc.returncode == -signal.SIGINT, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), stderr
    assert f"python train.py --resume {out_dir}" in lines[0]
    # Saved at the step it stopped at, in the middle of epoch 2 (not at an epoch boundary).
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and 0 < ck["step_in_epoch"] < TRAIN_STEPS_PER_EPOCH
    assert f"in epoch 2 after step {ck['step_in_epoch']}" in lines[0]

    _train_in_process(["--resume", out_dir])
    _assert_same_training_state(ref_dir / "checkpoint.pt", out_dir / "checkpoint.pt")
    assert _learned_rows(out_dir / "metrics.jsonl") == _learned_rows(ref_dir / "metrics.jsonl")


@slow
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    # The loss turns NaN in the middle of epoch 2: the run stops there with one line, and the
    # checkpoint of epoch 1 is what stays.
    real_step = train.Pretraining.step

    def step(self, net, imgs, labels, progress):
        loss, acc = real_step(self, net, imgs, labels, progress)
        return (loss * math.nan if progress > 1.5 / TRAIN_EPOCHS else loss), acc

    monkeypatch.setattr(train.Pretraining, "step", step)
    out_dir = tmp_path / "run"
    line = _fails(TRAIN_TINY + ["--epochs", TRAIN_EPOCHS, "--output-dir", out_dir], capsys)
    assert "non-finite in epoch 2 at step 10" in line and f"the last good checkpoint is {out_dir}" in line
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


# --------------------------------------------------------------------------------------------
# 2. The tasks: pre-training and fine-tuning
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["checkpoint.pt", "encoder.pt"])
@slow
def test_finetune_classifier_starts_from_the_pretrained_encoder(source, pretrained_run):
    ref_dir, _ = pretrained_run
    pretrained = torch.load(ref_dir / "encoder.pt", weights_only=True)
    heads = ["--heads", "2"] if source == "encoder.pt" else []  # an encoder.pt cannot tell its heads
    args = train.parse_args(ENCODER_TINY + heads + ["--finetune", str(ref_dir / source)])
    state = train.build_classifier(args, 10).encoder.state_dict()
    assert state.keys() == pretrained.keys()
    for k in state:
        assert torch.equal(state[k], pretrained[k]), k


@slow
def test_finetune_takes_size_patch_and_a_learned_position_embedding_from_the_checkpoint(tmp_path):
    pre = tmp_path / "pre"
    _train_in_process(TRAIN_TINY + ["--epochs", 1, "--pos-embed", "learnable", "--patch-size", "8",
                                    "--dim", "48", "--output-dir", pre])
    for source, extra in (("checkpoint.pt", []), ("encoder.pt", ["--heads", "2"])):
        args = train.parse_args(ENCODER_TINY + extra + ["--finetune", str(pre / source)])
        assert (args.img_size, args.patch_size, args.dim, args.depth, args.heads, args.pos_embed) == \
            (32, 8, 48, 2, 2, "learnable"), source
    # The learned embedding stays learned: it is loaded, trained, and moves.
    ft = tmp_path / "ft"
    _train_in_process(ENCODER_TINY + ["--finetune", pre / "checkpoint.pt", "--epochs", 1, "--output-dir", ft])
    before = torch.load(pre / "encoder.pt", weights_only=True)["pos_embed"]
    after = torch.load(ft / "checkpoint.pt", weights_only=True)["model"]["encoder.pos_embed"]
    assert not torch.equal(before, after)


@slow
def test_finetune_refuses_what_the_checkpoint_cannot_be(pretrained_run, tmp_path, capsys):
    ref_dir, _ = pretrained_run
    ck, enc = ref_dir / "checkpoint.pt", ref_dir / "encoder.pt"
    out = ["--output-dir", tmp_path / "out"]
    assert "--dim 64 differs from the encoder" in _fails(ENCODER_TINY + ["--finetune", ck, "--dim", "64"] + out, capsys)
    assert "--patch-size 8 differs" in _fails(ENCODER_TINY + ["--finetune", enc, "--heads", "2",
                                                              "--patch-size", "8"] + out, capsys)
    assert "pass --heads" in _fails(ENCODER_TINY + ["--finetune", enc] + out, capsys)
    assert "--model does not apply" in _fails(ENCODER_TINY + ["--finetune", ck, "--model", "small"] + out, capsys)


@slow
def test_finetune_from_scratch_does_not_load_the_pretrained_weights(pretrained_run):
    pretrained = torch.load(pretrained_run[0] / "encoder.pt", weights_only=True)
    args = train.parse_args(SCRATCH_TINY + ["--finetune", "scratch"])  # without the decoder flags
    state = train.build_classifier(args, 10).encoder.state_dict()
    for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"):
        assert not torch.equal(state[k], pretrained[k]), k


@slow
def test_finetune_run_reports_test_top1_and_a_second_one_does_not_overwrite_it(pretrained_run, tmp_path, capsys):
    out_dir = tmp_path / "ft"
    argv = ENCODER_TINY + ["--finetune", pretrained_run[0] / "checkpoint.pt", "--epochs", 1, "--output-dir", out_dir]
    stdout = _train_in_process(argv)
    assert re.search(r"test_top1 \d+\.\d\d%", stdout), stdout
    summaries = [r for r in _metrics(out_dir / "metrics.jsonl") if r.get("summary")]
    assert len(summaries) == 1 and 0 <= summaries[0]["test_top1"] <= 100
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["mode"] == "finetune" and ck["epoch"] == 1
    before = _snapshot(out_dir)
    assert "already holds a run" in _fails(argv, capsys)  # fine-tuning twice
    assert _snapshot(out_dir) == before


def small_vit():
    return droppos.ViT(img_size=32, patch_size=8, dim=16, depth=2, heads=2)


def test_forward_features_without_the_final_norm_is_the_last_blocks_output():
    enc, imgs = small_vit(), torch.randn(2, 3, 32, 32)
    raw = enc.forward_features(imgs, final_norm=False)
    assert torch.allclose(enc.norm(raw), enc.forward_features(imgs), atol=1e-6)


def test_mae_head_pools_without_the_encoders_norm_which_is_frozen():
    model, imgs = train.Classifier(small_vit(), 5, mae_head=True), torch.randn(2, 3, 32, 32)
    assert not model.encoder.norm.weight.requires_grad and not model.encoder.norm.bias.requires_grad
    nn.init.normal_(model.head.weight)  # a visible head
    before = model(imgs)
    with torch.no_grad():
        model.encoder.norm.weight.mul_(3.0).add_(1.0)
        model.encoder.norm.bias.add_(2.0)
    assert torch.allclose(model(imgs), before)  # the encoder's norm plays no part
    raw = model.encoder.forward_features(imgs, final_norm=False)
    assert torch.allclose(before, model.head(model.fc_norm(raw[:, 1:].mean(1))))


def test_laptop_head_pools_after_the_encoders_norm():
    model, imgs = train.Classifier(small_vit(), 5), torch.randn(2, 3, 32, 32)
    assert model.encoder.norm.weight.requires_grad
    nn.init.normal_(model.head.weight)
    before = model(imgs)
    with torch.no_grad():
        model.encoder.norm.bias.add_(torch.randn(16))
    assert not torch.allclose(model(imgs), before)


def test_build_classifier_takes_the_head_from_the_recipe():
    for recipe, mae in (("laptop", False), ("paper", True)):
        args = train.parse_args(SYNTH + ["--recipe", recipe, "--finetune", "scratch"])
        clf = train.build_classifier(args, 10)
        assert clf.mae_head is mae and isinstance(clf.fc_norm, nn.LayerNorm) and clf.head.out_features == 10


# --------------------------------------------------------------------------------------------
# 2. The tasks: the paper's location probe and MAE's linear probe, as runs
# --------------------------------------------------------------------------------------------

def _encoder_tensors(ck_path):
    return {k: v for k, v in torch.load(ck_path, weights_only=True)["model"].items() if k.startswith("encoder.")}


@slow
@pytest.mark.parametrize("probe", ["--location-probe", "--linear-probe"])
def test_a_probe_trains_only_its_head_and_leaves_the_encoder_bit_identical(probe, pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    out = tmp_path / "probe"
    stdout = _train_in_process(ENCODER_TINY + [probe, ref_dir / "checkpoint.pt", "--epochs", 2, "--output-dir", out])
    heads = 32 * 10 + 10 if probe == "--linear-probe" else 2 * (32 * 64 + 64) + 32  # small counts in full
    assert f"{heads:,} trainable parameters" in stdout.splitlines()[0]
    before, after = _encoder_tensors(ref_dir / "checkpoint.pt"), _encoder_tensors(out / "checkpoint.pt")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    summary = [r for r in _metrics(out / "metrics.jsonl") if r.get("summary")][-1]
    keys = ({"probe_top1", "probe_within1", "probe_distance", "control_top1"} if probe == "--location-probe"
            else {"test_top1"})
    assert keys <= summary.keys() and all(0 <= summary[k] <= 100 for k in keys if not k.endswith("distance"))
    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG"


def test_the_location_probe_learns_positions_that_are_there_and_cannot_invent_them():
    # Patch colours encode position, so a frozen random encoder's features carry it: trained on
    # the true positions the probe reads them; trained on positions shuffled within each image it
    # stays at chance (1/16) when scored on the truth, whatever it memorised.
    torch.manual_seed(0)
    with one_thread():
        accs = {}
        for shuffled in (False, True):
            probe = train.LocationProbe(droppos.ViT(8, 2, 3, 32, 1, 2), 0.75)
            opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=3e-2)
            for _ in range(150):
                head, _, dropped = probe(colour_coded_batch())
                truth = torch.arange(16).expand(32, -1)
                target = torch.stack([t[torch.randperm(16)] for t in truth]) if shuffled else truth
                loss = F.cross_entropy(head[dropped], target[dropped])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                head, _, dropped = probe(colour_coded_batch())
            accs[shuffled] = (head.argmax(-1) == torch.arange(16))[dropped].float().mean().item()
    assert accs[False] > 0.9 and abs(accs[True] - 1 / 16) < 0.06, accs


def test_location_probe_ratios_that_drop_no_position_are_one_line(tmp_path, capsys):
    probe = SCRATCH_TINY + ["--location-probe", "random", "--output-dir", tmp_path / "out"]
    for ratio, phrase in [("0", "must be in (0, 1]"), ("5", "must be in (0, 1]"), ("nan", "must be in (0, 1]"),
                          ("1e-20", "drops none of the 64 positions")]:  # 1 - 1e-20 == 1.0
        assert phrase in _fails(probe + ["--pos-mask-ratio", ratio], capsys), ratio


def test_a_location_probe_that_drops_every_position_reports_no_control(tmp_path):
    # No patch keeps its embedding, so the control has nothing to score: no NaN rows, no key.
    _train_in_process(SCRATCH_TINY + ["--location-probe", "random", "--pos-mask-ratio", "1", "--epochs", "1",
                                      "--output-dir", tmp_path])
    summary = [r for r in _metrics(tmp_path / "metrics.jsonl") if r.get("summary")][-1]
    assert "probe_top1" in summary and not any(k.startswith("control") for k in summary)
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))


@slow
def test_a_probe_run_resumes_exactly_after_sigkill(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    argv = ENCODER_TINY + ["--location-probe", ref_dir / "checkpoint.pt", "--epochs", 3]
    _train_in_process(argv + ["--output-dir", tmp_path / "ref"])
    proc = _start_train(argv + ["--output-dir", tmp_path / "run"], tmp_path)
    _wait_for_step_of_epoch(proc, tmp_path / "run" / "metrics.jsonl", epoch=2)
    proc.kill()
    proc.wait()
    _train_in_process(["--resume", tmp_path / "run"])
    _assert_same_training_state(tmp_path / "ref" / "checkpoint.pt", tmp_path / "run" / "checkpoint.pt")
    assert _learned_rows(tmp_path / "run" / "metrics.jsonl") == _learned_rows(tmp_path / "ref" / "metrics.jsonl")


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    pre, fine = root / "pre", root / "fine"
    train.main(SYNTH + ["--recipe", "paper", "--knn-every", "0", "--decoder-dim", "32", "--decoder-heads", "2",
                        "--output-dir", str(pre)])
    # --knn-every is a pre-training flag: fine-tuning refuses it
    train.main(SYNTH + ["--recipe", "paper", "--finetune", str(pre / "checkpoint.pt"), "--output-dir", str(fine)])
    return pre, fine


@slow
def test_paper_pretraining_runs_with_the_recipe_saved(paper_runs):
    pre, _ = paper_runs
    ck = torch.load(pre / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["args"]["recipe"] == "paper"
    assert (ck["args"]["blr"], ck["args"]["decoder_dim"], ck["args"]["decoder_depth"]) == (1.5e-4, 32, 2)
    assert (pre / "encoder.pt").exists() and (pre / "reassembly.png").exists()


@slow
def test_paper_finetuning_runs_and_leaves_the_encoders_norm_as_pretrained(paper_runs):
    pre, fine = paper_runs
    ck, pre_ck = torch.load(fine / "checkpoint.pt", weights_only=True), torch.load(pre / "checkpoint.pt",
                                                                                    weights_only=True)
    assert ck["mode"] == "finetune" and ck["epoch"] == 1 and ck["args"]["recipe"] == "paper"
    assert (ck["args"]["min_lr"], ck["args"]["clip_grad"], ck["args"]["warmup_epochs"]) == (1e-6, 0.0, 5.0)
    assert torch.equal(ck["model"]["encoder.norm.weight"], pre_ck["model"]["encoder.norm.weight"])  # frozen
    assert not torch.equal(ck["model"]["encoder.blocks.0.attn.qkv.weight"],
                           pre_ck["model"]["encoder.blocks.0.attn.qkv.weight"])  # the rest trained
    assert "test_top1" in (fine / "metrics.jsonl").read_text()


@slow
def test_resume_keeps_the_recipe_and_refuses_another(paper_runs):
    pre, _ = paper_runs
    assert train.parse_args(["--resume", str(pre)]).recipe == "paper"
    with pytest.raises(train.UserError, match="--recipe would change the run"):
        train.parse_args(["--resume", str(pre), "--recipe", "laptop"])


# --------------------------------------------------------------------------------------------
# 3. Optimiser and schedule
# --------------------------------------------------------------------------------------------

def test_lr_warms_up_linearly_peaks_at_base_lr_and_cosines_down_to_min_lr():
    total, warmup, base, low = 100, 10, 1e-3, 1e-5
    lrs = [train.lr_at(s, total, warmup, base, low) for s in range(total + 1)]
    rises = [b - a for a, b in zip(lrs[:warmup], lrs[1:warmup])]
    assert lrs[0] > 0 and all(math.isclose(d, base / warmup) for d in rises)  # linear from ~0
    assert max(lrs) == base == lrs[warmup - 1]
    after = lrs[warmup - 1:]
    assert all(b <= a for a, b in zip(after, after[1:]))  # never rises again
    assert math.isclose(lrs[total], low) and lrs[total - 1] - low < 1e-3 * base
    assert math.isclose(train.lr_at(10 * total, total, warmup, base, low), low)  # stays there
    assert math.isclose(train.lr_at(0, total, 0, base, low), base)  # no warm-up: starts at the peak


def test_param_groups_exempt_biases_norms_tokens_and_learnable_pos_embed_from_weight_decay():
    model = droppos.DropPos(img_size=16, patch_size=4, dim=32, depth=2, heads=2, decoder_dim=32,
                            decoder_depth=1, decoder_heads=2, pos_embed="learnable")
    groups = train.param_groups(model, 0.05)
    decay = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in decay, "a parameter in two groups"
            decay[id(p)] = g["weight_decay"]
    named = dict(model.named_parameters())
    assert decay.keys() == {id(p) for p in named.values() if p.requires_grad}
    no_decay = {n for n, p in named.items() if decay[id(p)] == 0.0}
    expected = {n for n in named if n.endswith(".bias") or ".norm" in n}  # LayerNorm weights
    expected |= {"encoder.cls_token", "mask_pos_token", "encoder.pos_embed"}
    assert no_decay == expected
    for n in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
              "encoder.blocks.1.mlp.fc1.weight", "decoder.embed.weight", "decoder.head.weight"):
        assert decay[id(named[n])] == 0.05, n


def test_finetune_layer_decay_scales_lr_from_head_down_to_embeddings():
    args = train.parse_args(SCRATCH_TINY + ["--finetune", "scratch", "--layer-decay", "0.5"])
    clf = train.build_classifier(args, 10)
    scale = lambda n: 0.5 ** (2 + 1 - train.layer_id(n, 2))  # as Finetuning builds it, depth 2
    groups = train.param_groups(clf, 0.05, scale)
    by_param = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(clf.named_parameters())
    assert by_param[id(named["head.weight"])] == 1.0
    assert by_param[id(named["encoder.blocks.1.attn.qkv.weight"])] == 0.5
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.25
    assert by_param[id(named["encoder.patch_embed.proj.weight"])] == 0.125


def decay_of(model, groups):
    """name -> weight decay of every parameter in a group (frozen ones are absent)."""
    where = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


def task_of(argv):
    """The Pretraining or Finetuning object train() builds for argv (no run folder is made)."""
    args = train.parse_args(SYNTH + argv)
    data = train.Data(args, CPU)
    return (train.Finetuning if args.finetune else train.Pretraining)(args, data, CPU)


def test_laptop_groups_spare_tokens_and_position_embeddings_in_both_modes():
    pre = task_of([])
    d = decay_of(pre.model, pre.groups)
    assert d["encoder.cls_token"] == d["mask_pos_token"] == 0.0
    assert d["encoder.blocks.0.attn.qkv.weight"] == 0.05 and d["encoder.blocks.0.attn.qkv.bias"] == 0.0
    fine = task_of(["--finetune", "scratch", "--pos-embed", "learnable"])
    d = decay_of(fine.model, fine.groups)
    assert d["encoder.cls_token"] == d["encoder.pos_embed"] == d["encoder.norm.weight"] == 0.0
    assert d["head.weight"] == 0.05


def test_paper_pretraining_groups_decay_cls_and_mask_tokens_but_not_biases_or_norms():
    task = task_of(["--recipe", "paper", "--decoder-dim", "32", "--decoder-heads", "2"])
    d = decay_of(task.model, task.groups)
    assert d["encoder.cls_token"] == d["mask_pos_token"] == 0.05
    assert d["encoder.blocks.1.norm2.weight"] == d["decoder.embed.bias"] == d["encoder.norm.bias"] == 0.0
    assert d["encoder.patch_embed.proj.weight"] == d["decoder.head.weight"] == 0.05
    assert "encoder.pos_embed" not in d  # fixed sin-cos: frozen, in no group
    learnable = droppos.DropPos(img_size=32, patch_size=8, dim=16, depth=1, heads=2, decoder_dim=16,
                                decoder_depth=1, decoder_heads=2, pos_embed="learnable")
    groups = train.param_groups(learnable, 0.05, no_decay=train.no_decay_rule("paper", "pretrain"))
    assert decay_of(learnable, groups)["encoder.pos_embed"] == 0.05  # timm's rule has no skip list


def test_paper_finetuning_groups_spare_1d_pos_embed_and_cls_and_leave_out_the_frozen_norm():
    task = task_of(["--recipe", "paper", "--finetune", "scratch", "--pos-embed", "learnable"])
    d = decay_of(task.model, task.groups)
    assert d["encoder.cls_token"] == d["encoder.pos_embed"] == d["head.bias"] == d["fc_norm.weight"] == 0.0
    assert d["head.weight"] == d["encoder.blocks.1.mlp.fc2.weight"] == d["encoder.patch_embed.proj.weight"] == 0.05
    assert "encoder.norm.weight" not in d and "encoder.norm.bias" not in d
    trainable = sorted(id(p) for p in task.model.parameters() if p.requires_grad)
    assert sorted(id(p) for g in task.groups for p in g["params"]) == trainable
    # layer-wise lr decay still applies: the patch embedding at 0.75 ** (depth + 1), the head at 1
    scale = {id(p): g["lr_scale"] for g in task.groups for p in g["params"]}
    assert scale[id(task.model.encoder.patch_embed.proj.weight)] == pytest.approx(0.75 ** 3)
    assert scale[id(task.model.head.weight)] == 1.0


def clipped(per_parameter, clip=1.0):
    """Gradients (3, 4) and (0.3, 0.4) (norms 5 and 0.5) after optimizer_step with lr 0."""
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    loss = (model.a * torch.tensor([3.0, 4.0])).sum() + (model.b * torch.tensor([0.3, 0.4])).sum()
    train.optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.0), loss, clip, per_parameter)
    return model.a.grad, model.b.grad


def test_per_parameter_clipping_caps_each_gradient_on_its_own():
    a, b = clipped(per_parameter=True)
    assert torch.allclose(a, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))  # official clip_gradients
    assert torch.allclose(b, torch.tensor([0.3, 0.4]))  # below the cap: untouched


def test_joint_clipping_shrinks_every_gradient_by_one_factor():
    a, b = clipped(per_parameter=False)
    total = math.sqrt(25.25)
    assert torch.allclose(a, torch.tensor([3.0, 4.0]) / total, atol=1e-6)
    assert torch.allclose(b, torch.tensor([0.3, 0.4]) / total, atol=1e-6)
    a, b = clipped(per_parameter=True, clip=0.0)  # 0 = no clipping
    assert torch.equal(a, torch.tensor([3.0, 4.0]))


def test_only_paper_pretraining_clips_per_parameter_and_paper_finetuning_does_not_clip():
    assert train.switch("paper", "pretrain", "clip_each")
    assert not train.switch("paper", "finetune", "clip_each")
    assert not train.switch("laptop", "pretrain", "clip_each") and not train.switch("laptop", "finetune", "clip_each")


# --------------------------------------------------------------------------------------------
# 4. Data: subsets, CIFAR-size sets in memory, photos per image, unreadable images
# --------------------------------------------------------------------------------------------

def _image_folder(root, size, per_class=8, classes=("cat", "dog")):
    """An ImageFolder of random size×size PNGs."""
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            torchvision.utils.save_image(torch.rand(3, size, size, generator=g), root / c / f"{i}.png")
    return root


def test_classes_and_per_class_keep_the_first_images_of_the_first_classes():
    assert train.take_classes([0, 1, 2, 0, 1, 2, 0, 1, 2], classes=2, per_class=2) == [0, 1, 3, 4]
    args = train.parse_args(["--dataset", "synthetic", "--synthetic-size", "100", "--classes", "3",
                             "--per-class", "5", "--device", "cpu"])
    tr, held_out, num_classes = train.load_datasets(args)
    assert num_classes == 3
    assert sorted(tr[i][1] for i in range(len(tr))) == [0] * 5 + [1] * 5 + [2] * 5
    assert {held_out[i][1] for i in range(len(held_out))} == {0, 1, 2}  # held out: those classes, every image


def test_crop_of_the_whole_image_is_the_image_and_flip_mirrors_it():
    x = torch.rand(2, 3, 12, 12)
    whole = torch.tensor([[0.0, 0.0, 12.0, 12.0]] * 2)
    out = train.resample_crops(x, whole, torch.tensor([False, True]), 12)
    torch.testing.assert_close(out[0], x[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1].flip(-1), atol=1e-5, rtol=0)


def _taps_inside(start, extent, size):
    """Output pixels whose 4 bicubic taps all fall inside [start, start + extent)."""
    src = start + (torch.arange(size) + 0.5) * extent / size - 0.5
    return (src.floor() - 1 >= start) & (src.floor() + 2 <= start + extent - 1)


@settings(max_examples=40)
@given(H=st.integers(4, 20), W=st.integers(4, 20), size=st.integers(4, 24), data=st.data())
def test_crop_is_a_bicubic_resize_of_its_box_wherever_the_kernel_stays_inside_the_box(H, W, size, data):
    h, w = data.draw(st.integers(4, H)), data.draw(st.integers(4, W))
    top, left = data.draw(st.integers(0, H - h)), data.draw(st.integers(0, W - w))
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    box = torch.tensor([[top, left, h, w]], dtype=torch.float32)
    out = train.resample_crops(x, box, torch.tensor([False]), size)
    ref = F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size), mode="bicubic",
                        align_corners=False)
    rows, cols = _taps_inside(top, h, size), _taps_inside(left, w, size)
    assume(rows.any() and cols.any())
    torch.testing.assert_close(out[..., rows, :][..., cols], ref[..., rows, :][..., cols], atol=1e-5, rtol=0)


@settings(max_examples=30)
@given(H=st.integers(1, 64), W=st.integers(1, 64), low=st.floats(0.01, 1.0), seed=st.integers(0, 99))
def test_crop_boxes_are_whole_pixel_boxes_inside_the_image(H, W, low, seed):
    boxes = train.random_crop_boxes(200, H, W, (low, 1.0), torch.Generator().manual_seed(seed))
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()


@pytest.mark.parametrize("low", [0.08, 0.2])  # fine-tuning's and pre-training's crop scales
def test_crop_boxes_are_drawn_like_torchvisions_random_resized_crop(low):
    # 4,000 boxes each; the tolerances are ~4 standard errors of each statistic.
    torch.manual_seed(0)
    n, img = 4000, torch.zeros(3, 32, 32)
    theirs = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(img, (low, 1.0), (3 / 4, 4 / 3))
                           for _ in range(n)], dtype=torch.float32)
    ours = train.random_crop_boxes(n, 32, 32, (low, 1.0), torch.Generator().manual_seed(0))
    stats = lambda b: torch.stack([(b[:, 2] * b[:, 3] / 1024).mean(), (b[:, 3] / b[:, 2]).log().mean(),
                                   (b[:, 0] + b[:, 2] / 2).mean() / 32, (b[:, 2] == 32).float().mean()])
    torch.testing.assert_close(stats(ours), stats(theirs), atol=0.02, rtol=0)


def test_cifar_size_sets_are_held_in_memory_with_their_exact_pixels():
    ds = train.SyntheticImages(20, 32)
    images, labels = train.decode_in_memory(ds, 32)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    for i in range(20):
        img, label = ds[i]
        assert torch.equal(images[i], torchvision.transforms.v2.functional.pil_to_tensor(img))
        assert labels[i] == label
    assert train.decode_in_memory(ds, 16) is None                       # not at the training size
    assert train.decode_in_memory(train.SyntheticImages(2, 96), 96) is None  # not CIFAR-size


@pytest.mark.parametrize("source, in_memory", [("synthetic", True), ("photos", False)])
def test_training_stream_gives_normalised_batches_seeded_by_epoch_and_step(source, in_memory, tmp_path):
    argv = ["--img-size", "32", "--batch-size", "4", "--device", "cpu", "--workers", "0"]
    if source == "synthetic":
        argv += ["--dataset", "synthetic", "--synthetic-size", "16"]
    else:  # 40-px photos at 32 px: cropped one by one from their full resolution
        argv += ["--dataset", "imagefolder", "--data-dir", str(_image_folder(tmp_path / "photos", 40))]
    args = train.parse_args(argv)
    train_set, _, _ = train.load_datasets(args)
    stream = train.TrainStream(train_set, args, 0, 1, "pretrain", torch.device("cpu"))
    assert stream.in_memory is in_memory
    epoch0 = [batch for _, batch in stream.epoch(0)]
    assert len(epoch0) == stream.steps == len(train_set) // 4
    for imgs, labels in epoch0:
        assert imgs.shape == (4, 3, 32, 32) and imgs.dtype == torch.float32 and labels.shape == (4,)
        pixels = imgs * torch.tensor(train.STD).view(3, 1, 1) + torch.tensor(train.MEAN).view(3, 1, 1)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # A resumed epoch sees exactly the crops of an uninterrupted one; the next epoch new ones.
    for (a, y), (step, (b, z)) in zip(epoch0[2:], stream.epoch(0, start_step=2), strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)
    assert not torch.equal(epoch0[0][0], next(iter(stream.epoch(1)))[1][0])


@pytest.mark.parametrize("size", [32, 40])  # held in memory / cropped per image
@slow
def test_an_unreadable_image_is_a_blank_stand_in_named_once(size, tmp_path, capsys):
    root = _image_folder(tmp_path / "photos", size, per_class=20)
    (root / "cat" / "empty.png").write_bytes(b"")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    out_dir = tmp_path / "run"
    _train_in_process(TRAIN_TINY[4:] + ["--dataset", "imagefolder", "--data-dir", root, "--img-size", 32,
                                        "--batch-size", 8, "--epochs", 2, "--output-dir", out_dir])
    err = capsys.readouterr().err
    for path in (root / "cat" / "empty.png", root / "dog" / "truncated.png"):
        assert err.count(f"warning: unreadable image {path}: a blank stand-in") == 1, err  # named once
    assert "Traceback" not in err
    # 42 images, every 10th held out (empty.png, the 21st, among them): 37 train, 4 batches of 8.
    assert [r["step"] for r in _metrics(out_dir / "metrics.jsonl") if not r.get("summary")] == [1, 2, 3, 4, 5, 6, 7, 8]
    stand_in = train.open_image(root / "cat" / "empty.png", 32)
    assert stand_in.size == (32, 32) and all(lo == hi for lo, hi in stand_in.getextrema())


def _warnings_of(argv, capsys):
    """The warning lines a one-epoch run prints before its first step."""
    _train_in_process(argv + ["--epochs", 1, "--knn-every", 0])
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


IMG_TINY = ["--dataset", "imagefolder", "--batch-size", "4", "--dim", "32", "--depth", "1", "--heads", "2",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--precision", "fp32",
            "--device", "cpu", "--workers", "0"]
AT_16_PX = ["--img-size", "16", "--patch-size", "4"]


@slow
@pytest.mark.parametrize("case", ["split-named classes", "untyped image size"])
def test_set_ups_that_are_almost_certainly_wrong_are_warned_before_training(case, tmp_path, capsys):
    data, argv = tmp_path / "data", IMG_TINY + AT_16_PX + ["--output-dir", tmp_path / "out"]
    if case == "split-named classes":  # the parent of train/ and test/ given as --data-dir
        _image_folder(data, 16, classes=("test", "train"))
        phrase = "named like splits"
    else:
        _image_folder(data, 16, per_class=12)
        argv = IMG_TINY + ["--patch-size", "56", "--output-dir", tmp_path / "out"]
        phrase = "are 16x16 px, but --imagefolder trains at 224 px"
    warnings = _warnings_of(argv + ["--data-dir", data], capsys)
    assert any(phrase in w for w in warnings), warnings


def test_fine_tuning_from_an_unfinished_run_names_its_epoch_in_the_start_up_line(pretrained_run, tmp_path):
    ck = torch.load(pretrained_run[0] / "checkpoint.pt", weights_only=True)
    ck["epoch"] = 1  # as if it had stopped after its first epoch
    torch.save(ck, tmp_path / "early.pt")
    stdout = _train_in_process(ENCODER_TINY + ["--finetune", tmp_path / "early.pt", "--epochs", 1,
                                               "--output-dir", tmp_path / "ft"])
    assert "(train.py checkpoint, epoch 1 of 3)" in stdout.splitlines()[0]


def test_the_start_up_line_names_images_classes_sizes_and_grid(pretrained_run):
    _, stdout = pretrained_run
    assert "256 images in 10 classes (25-26 per class), 32 px, patch 4, grid 8x8" in stdout.splitlines()[0]


def test_the_time_estimate_leaves_out_the_first_step_of_a_sitting(tmp_path, monkeypatch, capsys):
    clock = iter([0.0] + [100.0 + i for i in range(20)])  # the first step compiles for 100 s
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    log = train.Logger(tmp_path / "m.jsonl", CPU, 0, 10, 100, None, ("pos-acc", "pos_top1"), 0.0)
    one = torch.tensor(1.0)
    for step in range(1, 8):
        log.step(0, step, one, one, 16, 1e-3, {})
    assert "left 0:01:33" in capsys.readouterr().out.splitlines()[-1]  # 93 steps left at 1 s each


@slow
def test_a_bad_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "some_class").mkdir(parents=True)
    _image_folder(tmp_path / "photos", 32)
    base = TRAIN_TINY[4:] + ["--output-dir", tmp_path / "out", "--dataset", "imagefolder", "--img-size", 32]
    assert "does not exist" in _fails(base + ["--data-dir", tmp_path / "missing"], capsys)
    assert "holds no images" in _fails(base + ["--data-dir", tmp_path / "empty"], capsys)
    assert "holds no images" in _fails(base + ["--data-dir", tmp_path / "no_images"], capsys)
    assert "--val-dir folder" in _fails(base + ["--data-dir", tmp_path / "photos", "--val-dir", tmp_path / "empty"],
                                        capsys)
    assert "fewer than one batch" in _fails(base + ["--data-dir", tmp_path / "photos", "--batch-size", "1000"], capsys)
    cifar = TRAIN_TINY[4:] + ["--output-dir", tmp_path / "out", "--dataset", "cifar10"]
    assert "did you mean --dataset imagefolder?" in _fails(cifar + ["--data-dir", tmp_path / "photos"], capsys)


def test_sizes_the_patch_size_does_not_divide_and_impossible_ratios_are_one_line(tmp_path, capsys):
    out = ["--output-dir", tmp_path / "out", "--epochs", "1"]
    for extra, phrase in [(["--patch-size", "5"], "multiple of patch_size"),
                          (["--img-size", "30", "--patch-size", "4"], "multiple of patch_size"),
                          (["--mask-ratio", "1.0"], "--mask-ratio must be in [0, 1)"),
                          (["--mask-ratio", "0.99"], "mask_ratio must be in [0, 1) and leave at least one"),
                          (["--pos-mask-ratio", "0"], "--pos-mask-ratio must be in (0, 1]"),
                          (["--dim", "30"], "multiple of 4"), (["--heads", "3"], "multiple of the number of heads"),
                          (["--tau", "0"], "tau must be > 0")]:
        assert phrase in _fails(TRAIN_TINY + extra + out, capsys), extra
    assert "multiple of patch_size" in _fails(SCRATCH_TINY + ["--finetune", "scratch", "--patch-size", "5"] + out,
                                              capsys)


@slow
def test_a_bad_checkpoint_is_one_line(pretrained_run, tmp_path, capsys):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(bytes(range(256)) * 16)
    real = (pretrained_run[0] / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(real[: len(real) // 2])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # a valid torch file, but no checkpoint
    out = ["--output-dir", tmp_path / "out"]
    for path, phrase in [(tmp_path / "missing.pt", "does not exist"), (rnd, "cannot read checkpoint"),
                         (tmp_path / "truncated.pt", "cannot read checkpoint"),
                         (tmp_path / "tensor.pt", "not a training checkpoint")]:
        assert phrase in _fails(["--resume", path] + out, capsys), path
    for path, phrase in [(tmp_path / "missing.pt", "does not exist"), (rnd, "cannot read checkpoint"),
                         (tmp_path / "truncated.pt", "cannot read checkpoint"),
                         (tmp_path / "tensor.pt", "is not a checkpoint train.py can read: a Tensor")]:
        assert phrase in _fails(ENCODER_TINY + ["--finetune", path] + out, capsys), path


@pytest.mark.parametrize("case", ["unknown-dataset", "corrupt-checkpoint", "cifar-download-fails"])
@slow
def test_bad_input_on_the_command_line_prints_no_traceback(case, tmp_path):
    # The real program in its own process: what a user would see in the terminal.
    env = {}
    if case == "unknown-dataset":
        argv, phrase = ["--dataset", "mnist"], "invalid choice"
    elif case == "corrupt-checkpoint":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint" * 100)
        argv, phrase = ["--resume", tmp_path / "bad.pt"], "cannot read checkpoint"
    else:
        # Every proxy points at a closed local port, so the download fails at once, offline.
        proxy = "http://127.0.0.1:9"
        env = dict(https_proxy=proxy, http_proxy=proxy, HTTPS_PROXY=proxy, HTTP_PROXY=proxy, no_proxy="",
                   NO_PROXY="")
        (tmp_path / "data").mkdir()
        argv = ["--dataset", "cifar10", "--data-dir", tmp_path / "data", "--precision", "fp32"]
        phrase = "cifar-10-python.tar.gz"
    code, _, stderr = _run_train_cli(argv + ["--output-dir", tmp_path / "out"], tmp_path, **env)
    assert code == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert phrase in lines[0]
    if case == "cifar-download-fails":
        # How to place the archive by hand, where, and the offline alternative.
        assert "put it in" in lines[0] and str(tmp_path / "data") in lines[0]
        assert "--dataset synthetic" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_asking_for_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert "CUDA" in _fails(TRAIN_TINY + ["--device", "cuda", "--output-dir", tmp_path / "out"], capsys)


def test_laptop_augmentation_is_crop_flip_normalise():
    t = train.train_transform(32, finetune=True).transforms
    assert [type(x) for x in t] == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype,
                                    v2.Normalize]
    assert t[1].scale == (0.08, 1.0) and t[1].interpolation == v2.InterpolationMode.BICUBIC


def test_paper_augmentation_is_maes_randaugment_and_random_erasing():
    t = train.train_transform(32, finetune=True, mae_augment=True).transforms
    assert [type(x) for x in t] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, train.NoisyRandAugment,
                                    v2.ToImage, v2.ToDtype, v2.Normalize, v2.RandomErasing]
    assert t[0].scale == (0.08, 1.0) and t[0].interpolation == v2.InterpolationMode.BICUBIC
    ra, erase = t[2], t[6]
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.op_prob) == (2, 9.0, 0.5, 0.5)
    assert ra.pil_op.interpolation == v2.InterpolationMode.BICUBIC and ra.pil_op.fill == [124, 116, 104]
    assert erase.p == 0.25 and erase.value is None  # None: per-pixel N(0, 1), timm's mode 'pixel'
    assert erase.scale == pytest.approx((0.02, 1 / 3)) and erase.ratio == pytest.approx((0.3, 1 / 0.3))
    assert tuple(t[5].mean) == train.MEAN


def test_randaugment_levels_are_noisy_around_9_and_clipped():
    torch.manual_seed(0)
    bins = torch.tensor([train.NoisyRandAugment().sample_bin() for _ in range(2000)], dtype=torch.float)
    assert bins.mean().item() == pytest.approx(90, abs=0.6) and bins.std().item() == pytest.approx(5, abs=0.6)
    assert 0 <= bins.min().item() and bins.max().item() <= 100


def test_paper_finetuning_stream_augments_per_image_and_replays_on_resume():
    paper = train.parse_args(SYNTH + ["--recipe", "paper", "--finetune", "scratch"])
    stream = train.TrainStream(train.Data(paper, CPU).train, paper, 0, 1, "finetune", torch.device("cpu"))
    assert not stream.in_memory and isinstance(stream.data, train.SeededTransform)
    assert any(isinstance(x, train.NoisyRandAugment) for x in stream.data.transform.transforms)
    whole = [imgs for _, (imgs, _) in stream.epoch(0)]
    _, (resumed, _) = next(stream.epoch(0, start_step=2))
    assert torch.equal(resumed, whole[2]) and whole[0].shape == (16, 3, 32, 32)
    for argv, mode in ((["--finetune", "scratch"], "finetune"), (["--recipe", "paper"], "pretrain")):
        args = train.parse_args(SYNTH + argv)  # laptop fine-tuning and paper pre-training: in memory
        assert train.TrainStream(train.Data(args, CPU).train, args, 0, 1, mode, torch.device("cpu")).in_memory


def test_paper_evaluation_at_224_px_resizes_to_256_then_crops_224():
    args = train.parse_args(["--dataset", "imagefolder", "--recipe", "paper", "--finetune", "scratch"])
    assert args.img_size == 224 and train.eval_crop_pct(args) == 224 / 256
    t = train.eval_transform(args.img_size, train.eval_crop_pct(args)).transforms
    assert [type(x) for x in t] == [v2.ToImage, v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize]
    assert t[1].size == [256] and t[1].interpolation == v2.InterpolationMode.BICUBIC and t[2].size == (224, 224)
    photo = v2.functional.to_pil_image(torch.rand(3, 260, 300))
    assert train.eval_transform(224, 224 / 256)(photo).shape == (3, 224, 224)
    big = train.parse_args(["--dataset", "imagefolder", "--recipe", "paper", "--img-size", "384"])
    assert train.eval_crop_pct(big) == 1.0  # MAE: no border dropped above 224 px


def test_laptop_evaluation_resizes_to_the_crop_size():
    args = train.parse_args(["--dataset", "imagefolder", "--finetune", "scratch"])
    assert train.eval_crop_pct(args) == 1.0
    t = train.eval_transform(224, train.eval_crop_pct(args)).transforms
    assert t[1].size == [224] and t[2].size == (224, 224)


# --------------------------------------------------------------------------------------------
# 5. Evaluation: k-NN monitor, the reassembly picture
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [5, 1000])  # 1000 > the 60 features in the bank
def test_knn_classify_labels_well_separated_clusters_perfectly(k):
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 16)  # three orthogonal unit directions
    bank_y = torch.arange(3).repeat_interleave(20)
    bank = F.normalize(centres[bank_y] + 0.05 * torch.randn(60, 16, generator=g), dim=1)
    test_y = torch.arange(3).repeat(11)
    test = F.normalize(centres[test_y] + 0.05 * torch.randn(33, 16, generator=g), dim=1)
    pred = train.knn_classify(bank, bank_y, test, num_classes=3, k=k, chunk=7)  # chunks of 7 queries
    assert torch.equal(pred, test_y)


@slow
def test_knn_monitor_reports_top1_at_the_end_of_pretraining(tmp_path):
    out_dir = tmp_path / "run"
    stdout = _train_in_process(TRAIN_TINY + ["--knn-every", 1, "--epochs", 1, "--output-dir", out_dir])
    assert re.search(r"knn_top1 \d+\.\d\d%", stdout), stdout
    summary = [r for r in _metrics(out_dir / "metrics.jsonl") if r.get("summary")]
    assert len(summary) == 1 and 0 <= summary[0]["knn_top1"] <= 100


PICTURE_P, PICTURE_GRID = 2, (2, 2)  # 4×4 images, 4 patches: cell k is rows 2·(k//2).., cols 2·(k%2)..


def _patch_coloured_images():
    """(1, 3, 4, 4), patch k filled with the distinct colour (k/4, 1 - k/4, 0.25)."""
    imgs = torch.zeros(1, 3, 4, 4)
    for k in range(4):
        i, j = divmod(k, 2)
        imgs[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = torch.tensor([k / 4, 1 - k / 4, 0.25])[:, None, None]
    return imgs


def _cell(img, k):  # (3, 4, 4) -> (3, 2, 2)
    i, j = divmod(k, 2)
    return img[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]


def _picture_rows(ids_keep, pred, conf, dropped=None, weights=None, imgs=None):
    """The rows for one image whose visible patches `ids_keep` are predicted at `pred` with
    probability `conf`."""
    imgs = _patch_coloured_images() if imgs is None else imgs
    probs = torch.zeros(1, len(pred), 4)
    for t, (k, c) in enumerate(zip(pred, conf)):
        probs[0, t] = (1 - c) / 3
        probs[0, t, k] = c
    ids = torch.tensor([ids_keep])
    dropped = torch.ones_like(ids, dtype=torch.bool) if dropped is None else torch.tensor([dropped])
    weights = torch.full((1, 4), 0.25) if weights is None else torch.tensor([weights])
    return imgs, *train.reassembly_rows(imgs, ids, dropped, probs, weights, PICTURE_GRID, PICTURE_P)


def test_picture_predicted_row_puts_each_patch_in_its_predicted_cell_and_leaves_the_rest_grey():
    imgs, rows, info = _picture_rows(ids_keep=[1, 2], pred=[3, 0], conf=[0.9, 0.8])
    moved = rows["predicted"][0]
    assert torch.equal(_cell(moved, 3), _cell(imgs[0], 1)) and torch.equal(_cell(moved, 0), _cell(imgs[0], 2))
    assert (_cell(moved, 1) == 0.5).all() and (_cell(moved, 2) == 0.5).all()
    assert info["collisions"] == [[]]


def test_picture_visible_row_keeps_patches_in_place_and_marks_only_given_positions():
    imgs, rows, info = _picture_rows(ids_keep=[3, 0], pred=[3, 0], conf=[0.9, 0.9], dropped=[True, False])
    vis = rows["visible"][0]
    assert torch.equal(_cell(vis, 3), _cell(imgs[0], 3)) and torch.equal(_cell(vis, 0), _cell(imgs[0], 0))
    assert (_cell(vis, 1) == 0.5).all() and (_cell(vis, 2) == 0.5).all()
    assert info["kept"].tolist() == [[True, False, False, False]]  # patch 0 was given its position
    assert torch.equal(rows["original"], imgs)


def test_picture_collisions_show_the_most_confident_patch_and_count_the_others():
    imgs, rows, info = _picture_rows(ids_keep=[0, 1, 3], pred=[2, 2, 2], conf=[0.5, 0.9, 0.6])
    assert torch.equal(_cell(rows["predicted"][0], 2), _cell(imgs[0], 1))
    assert info["collisions"] == [[(2, 3)]]
    _, _, info = _picture_rows(ids_keep=[0, 1, 3], pred=[0, 2, 2], conf=[0.9, 0.9, 0.6])
    assert info["correct"].tolist() == [[True, False, False, False]]  # cell 2 shows patch 1, not 2


def test_picture_heat_map_is_brightest_where_the_attentive_weight_is_largest():
    flat = torch.full((1, 3, 4, 4), 0.5)
    _, rows, _ = _picture_rows([0], [0], [0.9], imgs=flat, weights=[0.1, 0.6, 0.2, 0.1])
    brightness = [_cell(rows["attention"][0], k).mean().item() for k in range(4)]
    assert max(range(4), key=brightness.__getitem__) == 1
    assert brightness[2] > brightness[0] == pytest.approx(brightness[3])


def test_picture_is_enlarged_nearest_neighbour_with_a_label_column():
    B, scale = 2, 4
    imgs = torch.zeros(B, 3, 32, 32)
    imgs[:, 2] = 1  # blue, with one magenta pixel per image that must become a crisp 4×4 block
    imgs[:, :, 5, 7] = torch.tensor([1.0, 0.0, 1.0])
    rows, info = train.reassembly_rows(imgs, torch.tensor([[0, 9]] * B), torch.ones(B, 2, dtype=torch.bool),
                                       torch.softmax(torch.randn(B, 2, 64), -1), torch.full((B, 64), 1 / 64), (8, 8), 4)
    pic = train.draw_reassembly({"original": rows["original"]}, info, scale, ["original"], "legend")
    px = torchvision.transforms.v2.functional.pil_to_tensor(pic).permute(1, 2, 0).long()  # (H, W, 3)
    magenta = (px == torch.tensor([255, 0, 255])).all(-1)
    assert magenta.sum() == B * scale ** 2  # nearest neighbour: no blended magenta
    ys, xs = magenta.nonzero().unbind(1)
    x_img = xs.min().item() - 7 * scale  # left edge of the first image
    assert x_img >= 40  # room for the label at the left ...
    band = px[ys.min() - 5 * scale: ys.min() - 5 * scale + 32 * scale, :x_img]
    assert (band.sum(-1) < 200).any()  # ... and dark text pixels in it, beside the row


def test_save_reassembly_is_the_same_picture_each_time_and_leaves_training_untouched(tmp_path):
    torch.manual_seed(0)
    model = droppos.DropPos(img_size=8, patch_size=2, dim=32, depth=1, heads=2,
                            decoder_dim=16, decoder_depth=1, decoder_heads=2)
    imgs, path = torch.randn(8, 3, 8, 8), tmp_path / "reassembly.png"
    proc = train.Proc(0, 1, 0, torch.device("cpu"), "fp32")
    rng = torch.get_rng_state()
    train.save_reassembly(model, imgs, path, proc)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    first = path.read_bytes()
    torch.rand(10)  # training moves on between epochs
    train.save_reassembly(model, imgs, path, proc)
    assert path.read_bytes() == first  # the same masks every time, so epochs compare
    assert [p.name for p in tmp_path.iterdir()] == ["reassembly.png"]


# --------------------------------------------------------------------------------------------
# 5. Evaluation: position scores; 12. the beliefs picture and curves.png
# --------------------------------------------------------------------------------------------

def brute_scores(probs, true_pos, grid):
    """train.position_scores, one patch and one cell pair at a time."""
    h, w = grid
    N = h * w
    top1 = within1 = dist = 0.0
    for p, t in zip(probs.tolist(), true_pos.tolist()):
        a = max(range(N), key=lambda k: p[k])
        dr, dc = a // w - t // w, a % w - t % w
        top1 += a == t
        within1 += max(abs(dr), abs(dc)) <= 1
        dist += math.hypot(dr, dc)
    pairs = list(itertools.product(range(N), repeat=2))
    chance_w = sum(max(abs(a // w - t // w), abs(a % w - t % w)) <= 1 for t, a in pairs) / N / N
    chance_d = sum(math.hypot(a // w - t // w, a % w - t % w) for t, a in pairs) / N / N
    M = len(true_pos)
    return dict(top1=top1 / M, within1=within1 / M, distance=dist / M, chance_top1=1 / N,
                chance_within1=chance_w, chance_distance=chance_d)


def colours(img):
    """The set of RGB colours an image uses."""
    return {c for _, c in img.getcolors(maxcolors=1 << 24)}


def one_hot(true_pos, N):
    return torch.nn.functional.one_hot(true_pos, N).float()


@pytest.mark.parametrize("grid", [(2, 2), (3, 4), (8, 8)])
def test_perfect_predictions_score_top1_and_within1_of_one_and_distance_zero(grid):
    N = grid[0] * grid[1]
    true = torch.arange(N).repeat(2)
    s = train.position_scores(one_hot(true, N), true, grid)
    assert (s["top1"], s["within1"], s["distance"]) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("grid", [(2, 2), (3, 4), (8, 8)])
def test_scores_of_random_predictions_equal_a_brute_force_loop(grid):
    g = torch.Generator().manual_seed(sum(grid))
    N = grid[0] * grid[1]
    probs = torch.rand(50, N, generator=g).softmax(1)  # continuous: no argmax ties
    true = torch.randint(0, N, (50,), generator=g)
    got, want = train.position_scores(probs, true, grid), brute_scores(probs, true, grid)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k


def test_chance_values_are_one_over_n_and_the_counted_neighbourhoods_on_8x8():
    s = train.position_scores(torch.rand(3, 64), torch.tensor([0, 9, 63]), (8, 8))
    assert s["chance_top1"] == 1 / 64
    assert s["chance_within1"] == pytest.approx((4 * 4 + 24 * 6 + 36 * 9) / 64 / 64)


def test_chance_distance_of_a_2x2_grid_averages_0_1_1_and_sqrt2():
    s = train.position_scores(torch.rand(1, 4), torch.tensor([0]), (2, 2))
    assert s["chance_distance"] == pytest.approx((0 + 1 + 1 + math.sqrt(2)) / 4)
    assert s["chance_within1"] == 1.0

def test_belief_matrices_rows_sum_to_one_and_match_a_loop():
    g = torch.Generator().manual_seed(1)
    h, w = 3, 4
    probs = torch.rand(40, h * w, generator=g).softmax(1)
    true = torch.cat([torch.arange(h * w), torch.randint(0, h * w, (28,), generator=g)])
    rows, cols = train.row_col_beliefs(probs, true, (h, w))
    assert rows.shape == (h, h) and cols.shape == (w, w)
    torch.testing.assert_close(rows.sum(1), torch.ones(h))
    torch.testing.assert_close(cols.sum(1), torch.ones(w))
    p = probs.view(-1, h, w)
    for i in range(h):
        torch.testing.assert_close(rows[i], p[true // w == i].sum(2).mean(0))
    for j in range(w):
        torch.testing.assert_close(cols[j], p[true % w == j].sum(1).mean(0))


def test_belief_matrices_of_perfect_predictions_are_the_identity():
    true = torch.arange(12)
    rows, cols = train.row_col_beliefs(one_hot(true, 12), true, (3, 4))
    assert torch.equal(rows, torch.eye(3)) and torch.equal(cols, torch.eye(4))


def test_a_true_row_no_patch_has_is_nan_not_a_fake_row():
    true = torch.tensor([0, 1])  # both in row 0 of a 2x2 grid
    rows, _ = train.row_col_beliefs(one_hot(true, 4), true, (2, 2))
    assert rows[0].tolist() == [1.0, 0.0] and rows[1].isnan().all()


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (3, 4)])
def test_draw_beliefs_of_perfect_predictions_draws_max_colour_on_diagonal_zero_off(grid):
    N = grid[0] * grid[1]
    true = torch.arange(N)
    img = train.draw_beliefs(one_hot(true, N), true, grid, examples=3)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert 300 < img.width < 2000 and 200 < img.height < 1200
    assert (0, 220, 255) in colours(img)  # true cells outlined in cyan
    x0, y0 = train.ORIGIN  # map A; map B sits (h + 2) cells to its right
    for n, x0 in ((grid[0], x0), (grid[1], x0 + (grid[0] + 2) * train.CELL)):
        for i, j in itertools.product(range(n), repeat=2):
            want = (255, 255, 255) if i == j else (0, 0, 0)
            cx, cy = x0 + j * train.CELL + train.CELL // 2, y0 + i * train.CELL + train.CELL // 2
            assert img.getpixel((cx, cy)) == want


def test_draw_beliefs_copes_with_fewer_patches_than_examples():
    img = train.draw_beliefs(torch.rand(2, 16).softmax(1), torch.tensor([3, 5]), (4, 4), examples=6)
    assert img.mode == "RGB"


def realistic_rows(epochs=3, per_epoch=5, spe=20):
    rows = []
    for e in range(1, epochs + 1):
        for j in range(1, per_epoch + 1):
            step = (e - 1) * spe + j * spe // per_epoch  # the epoch's last step is always logged
            rows.append(dict(epoch=e, step=step, loss=4 - step / 30, acc=0.02 + step / 200,
                             lr=1e-4 * min(1, step / 20), sigma=1 - step / 60, images_per_sec=40.0))
        summary = dict(epoch=e, summary=True, loss=4 - e / 2, acc=0.1 * e,
                       elapsed_s=9.0 * e)
        rows.append(summary | ({"knn_top1": 10.0 + e} if e % 2 else {}))
    return rows


def test_draw_curves_draws_a_realistic_run_as_an_rgb_grid_of_panels():
    img = train.draw_curves(realistic_rows(), 20, chance={"acc": 1 / 64, "knn_top1": 10.0})
    assert img.mode == "RGB"
    assert img.width >= 3 * 280 and img.height >= 2 * 160  # loss acc knn / lr sigma: two rows
    assert (210, 70, 0) in colours(img)  # summary dots


def test_draw_curves_of_no_rows_is_a_small_image_saying_so():
    img = train.draw_curves([])
    assert img.mode == "RGB" and img.width < 300 and img.height < 100
    assert (0, 0, 0) in colours(img)


def test_draw_curves_skips_nan_and_missing_values():
    rows = realistic_rows()
    rows[2]["loss"] = float("nan")
    rows[5]["knn_top1"] = float("nan")
    del rows[7]["acc"]
    rows.append(dict(epoch=4, step=65, loss=float("inf"), lr=float("nan")))
    assert train.draw_curves(rows, 20).mode == "RGB"


def test_draw_curves_draws_a_single_row_of_either_kind():
    rows = realistic_rows()
    assert train.draw_curves(rows[:1]).mode == "RGB"
    assert train.draw_curves([rows[5]]).mode == "RGB"


def test_curves_have_five_ticks_a_panel_and_the_probes_control_has_its_chance_line():
    img = train.draw_curves([dict(epoch=e, summary=True, control_top1=10.0 * e) for e in (1, 2)],
                            chance={"control_top1": 6.25})
    ticks = [y for y in range(img.height) if img.getpixel((train.PAD + 46, y)) == (128, 128, 128)]
    assert len(ticks) == 5  # the ends and three between
    probe = SimpleNamespace(model=SimpleNamespace(encoder=SimpleNamespace(grid=(4, 4))))
    chance = train.LocationProbing.chance(probe)
    assert chance["control_top1"] == chance["probe_top1"] == 100 / 16


def test_draw_curves_draws_the_keys_train_py_writes_one_panel_each():
    rows = [dict(epoch=1, step=s, loss=3 - s / 9, pos_top1=2.0 + s, train_top1=5.0 + s, lr=1e-3,
                 sigma=0.5, images_per_sec=9.0, elapsed_s=1.0) for s in (5, 10)]
    rows.append(dict(epoch=1, summary=True, loss=2.0, pos_top1=10.0, train_top1=12.0, lr=1e-3,
                     sigma=0.5, test_pos_top1=9.0, test_pos_within1=30.0, test_pos_distance=2.5,
                     knn_top1=20.0, test_top1=21.0, probe_top1=22.0, probe_within1=40.0,
                     probe_distance=2.0, control_top1=10.0))
    img = train.draw_curves(rows, 10, chance={"pos_top1": 1 / 64 * 100, "test_pos_distance": 4.14})
    assert img.mode == "RGB" and img.size[1] >= 5 * 160  # 14 keys in 3 columns
    assert (210, 70, 0) in colours(img) and (128, 128, 128) in colours(img)  # dots, chance line


# --------------------------------------------------------------------------------------------
# 6. The command line
# --------------------------------------------------------------------------------------------

def test_help_gives_every_flag_a_meaning_its_default_and_its_choices():
    parser = train.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    assert "{cifar10,cifar100,imagefolder,synthetic}" in text
    assert re.search(r"--mask-ratio MASK_RATIO\s+γ: share of patches hidden \(default: 0.75\)", text)
    assert "(default: None)" not in text


# (flags, a phrase the one error line must contain); none of these needs a file or a run
BAD_FLAGS = [
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--epoks", "3"], "unrecognized arguments: --epoks"),
    (["--blr", "-1"], "--blr must be > 0, got -1"),
    (["--blr", "nan"], "--blr must be > 0, got nan"),
    (["--drop-path", "1.5", "--finetune", "scratch"], "--drop-path must be in [0, 1), got 1.5"),
    (["--layer-decay", "0", "--finetune", "scratch"], "--layer-decay must be in (0, 1]"),
    (["--sigma", "-1"], "--sigma must be >= 0, got -1"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--classes", "0"], "--classes must be >= 1"),
    (["--classes", "-1"], "--classes must be >= 1"),
    (["--per-class", "0"], "--per-class must be >= 1"),
    (["--img-size", "0"], "--img-size must be in [1, "),
    (["--patch-size", "0"], "--patch-size must be in [1, "),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    (["--log-every", "-1"], "--log-every must be >= 0"),
    (["--mixup", "0"], "--mixup applies only with --finetune"),
    (["--finetune", "scratch", "--mask-ratio", "0.5"], "--mask-ratio applies only with pre-training or --benchmark"),
    (["--finetune", "scratch", "--knn-every", "1"], "--knn-every applies only with pre-training"),
    (["--benchmark", "--finetune", "scratch"], "--finetune does not apply with --benchmark"),
    (["--evaluate", "x.pt", "--epochs", "3"], "--epochs applies only with pre-training or --finetune or"),
    (["--linear-probe", "random", "--pos-mask-ratio", "0.5"],
     "--pos-mask-ratio applies only with pre-training or --benchmark or --location-probe"),
    (["--location-probe", "random", "--linear-probe", "random"], "does not apply with --location-probe"),
    (["--evaluate", "random"], "--evaluate scores a checkpoint, not 'random'"),
    (["--dim", str(2 ** 31)], "--dim must be in [1, 2147483648), got 2147483648"),
    (["--dataset", "synthetic", "--data-dir", "x"], "--data-dir applies only with --dataset cifar10 or"),
    (["--val-dir", "x"], "--val-dir applies only with --dataset imagefolder"),
    (["--synthetic-size", "5"], "--synthetic-size applies only with --dataset synthetic"),
    (["--benchmark", "--epochs", "3"], "--epochs applies only with pre-training or --finetune"),
    (["--benchmark", "--knn-every", "2"], "--knn-every applies only with pre-training"),
    (["--benchmark"], "--output-dir applies only with pre-training"),  # the test adds --output-dir
]


@pytest.mark.parametrize("argv, phrase", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_error_line_and_exit_2_before_anything_runs(argv, phrase, tmp_path, capsys):
    line = _fails(argv + ["--output-dir", tmp_path / "out"], capsys)
    assert phrase in line
    assert not (tmp_path / "out").exists()


def test_default_folders_differ_for_pretraining_scratch_and_each_checkpoint(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        torch.save({}, tmp_path / run / "encoder.pt")
    folder = lambda *argv: train.default_run_name(argparse.Namespace(
        **dict(dict(dataset="cifar10", finetune=None, seed=0, recipe="laptop"), **dict(zip(argv[::2], argv[1::2])))))
    names = [folder(), folder("finetune", "scratch"), folder("finetune", str(tmp_path / "a" / "encoder.pt")),
             folder("finetune", str(tmp_path / "b" / "encoder.pt")), folder("seed", 1),
             folder("finetune", "scratch", "recipe", "paper", "seed", 2)]
    assert names == ["cifar10-pretrain", "cifar10-scratch", "a-finetune", "b-finetune", "cifar10-pretrain-seed1",
                     "cifar10-scratch-paper-seed2"]


def test_paper_pretraining_defaults_are_the_official_ones_and_laptop_stays_as_it_was():
    paper = train.parse_args(["--dataset", "synthetic", "--recipe", "paper"])
    assert (paper.blr, paper.warmup_epochs, paper.min_lr, paper.weight_decay, paper.clip_grad) == \
        (1.5e-4, 10.0, 0.0, 0.05, 5.0)
    assert (paper.decoder_dim, paper.decoder_depth, paper.decoder_heads) == (512, 2, 16)  # at tiny too
    assert train.model_config(paper)["decoder_dim"] == 512 and train.model_config(paper)["dim"] == 192
    laptop = train.parse_args(["--dataset", "synthetic"])
    assert laptop.recipe == "laptop"
    assert (laptop.blr, laptop.warmup_epochs, laptop.min_lr, laptop.weight_decay, laptop.clip_grad) == \
        (2e-3, 1.0, 0.0, 0.05, 5.0)
    assert train.model_config(laptop)["decoder_dim"] == 192  # the preset's


def test_paper_finetuning_defaults_are_maes_recipe():
    a = train.parse_args(["--dataset", "synthetic", "--recipe", "paper", "--finetune", "scratch"])
    assert (a.blr, a.layer_decay, a.warmup_epochs, a.min_lr, a.weight_decay, a.clip_grad) == \
        (1e-3, 0.75, 5.0, 1e-6, 0.05, 0.0)
    assert (a.drop_path, a.mixup, a.cutmix, a.smoothing) == (0.1, 0.8, 1.0, 0.1)
    assert a.decoder_dim is None  # pre-training's table does not reach fine-tuning


def test_a_typed_flag_wins_over_the_recipe():
    a = train.parse_args(["--dataset", "synthetic", "--recipe", "paper", "--blr", "1e-3", "--decoder-dim", "32",
                          "--warmup-epochs", "0"])
    assert (a.blr, a.decoder_dim, a.warmup_epochs) == (1e-3, 32, 0.0)
    assert (a.decoder_depth, a.decoder_heads, a.min_lr) == (2, 16, 0.0)  # the untyped ones still follow it
    f = train.parse_args(["--dataset", "synthetic", "--recipe", "paper", "--finetune", "scratch",
                          "--clip-grad", "1", "--min-lr", "0"])
    assert (f.clip_grad, f.min_lr, f.warmup_epochs) == (1.0, 0.0, 5.0)


def test_recipe_is_a_run_flag_and_help_states_the_paper_defaults():
    assert "recipe" not in train.FREE_ON_RESUME
    with pytest.raises(train.UserError, match="invalid choice"):
        train.parse_args(["--recipe", "imagenet"])
    text = " ".join(train.build_parser().format_help().split())
    assert "RECIPES in train.py lists every value" in text
    paper = train.RECIPES["paper"]
    assert (paper["pretrain"]["blr"], paper["pretrain"]["warmup_epochs"]) == (1.5e-4, 10)
    assert (paper["finetune"]["blr"], paper["finetune"]["warmup_epochs"]) == (1e-3, 5)


# --------------------------------------------------------------------------------------------
# 7. Checkpoints from anywhere: train.py's, the official DropPos code's, MAE's, timm's
# --------------------------------------------------------------------------------------------

OFFICIAL = {"decoder.embed.": "decoder_embed.", "decoder.blocks.": "decoder_blocks.",
            "decoder.norm.": "decoder_norm.", "decoder.head.": "decoder_pred.", "encoder.": ""}


def tiny_state(pos_embed="sincos"):  # N = 16 positions, p*p*3 = 48 pixels
    torch.manual_seed(0)
    return droppos.DropPos(img_size=16, patch_size=4, dim=32, depth=2, heads=2, decoder_dim=32,
                   decoder_depth=1, decoder_heads=2, pos_embed=pos_embed).state_dict()


def official(ours, prefix=""):
    """Our DropPos state dict in the official code's key names."""
    out = {}
    for k, v in ours.items():
        old = next((o for o in OFFICIAL if k.startswith(o)), "")
        out[prefix + OFFICIAL.get(old, "") + k[len(old):]] = v
    return out


def encoder_part(ours):
    return {k: v for k, v in ours.items() if k.startswith("encoder.")}


def load_as_file(obj, tmp_path):
    torch.save(obj, tmp_path / "x.pt")
    return train.import_state(train.load_checkpoint(tmp_path / "x.pt"), "x.pt")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_py_checkpoint_loads_model_args_mode_epoch(tmp_path):
    sd = tiny_state()
    args = {"img_size": 16, "patch_size": 4, "model": "tiny", "heads": 2}
    got = load_as_file({"mode": "pretrain", "args": args, "model": sd, "optimizer": {}, "epoch": 3,
                "step_in_epoch": 0}, tmp_path)
    assert same(got.model, sd) and got.args == args and (got.mode, got.epoch) == ("pretrain", 3)
    assert got.source == "train.py checkpoint"


def test_train_py_finetune_checkpoint_leaves_the_classifier_head_out(tmp_path):
    sd = encoder_part(tiny_state())
    head = {"fc_norm.weight": torch.ones(32), "head.weight": torch.zeros(10, 32)}
    got = load_as_file({"mode": "finetune", "args": {}, "model": {**sd, **head}, "epoch": 1}, tmp_path)
    assert same(got.model, sd) and got.mode == "finetune"


def test_train_py_encoder_pt_loads_under_encoder_prefix(tmp_path):
    sd = encoder_part(tiny_state())
    got = load_as_file({k.removeprefix("encoder."): v for k, v in sd.items()}, tmp_path)
    assert same(got.model, sd) and got.source == "train.py encoder" and got.args is None


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_layout_with_or_without_ddp_prefix_loads_same_tensors(tmp_path, prefix):
    sd = tiny_state()
    name = "DropPos_mae_vit_base_patch16_dec512d2b"
    got = load_as_file({"epoch": 5, "state_dict": official(sd, prefix), "optimizer": {}, "model": name},
               tmp_path)
    assert same(got.model, sd) and got.epoch == 5 and got.arch["name"] == name and got.extra == {}


def test_save_model_layout_with_namespace_loads_under_weights_only(tmp_path):
    sd = tiny_state()
    ns = argparse.Namespace(model="DropPos_mae_vit_base_patch16_dec512d2b", input_size=16,
                            mask_ratio=0.75, pos_mask_ratio=0.5, lr=1e-3)
    got = load_as_file({"model": official(sd), "optimizer": {}, "epoch": 4, "scaler": {}, "args": ns},
               tmp_path)
    assert same(got.model, sd) and got.epoch == 5 and got.arch["decoder_depth"] == 2
    assert got.extra == {"mask_ratio": 0.75, "pos_mask_ratio": 0.5}


def test_mae_pixel_decoder_is_ignored_not_mapped_to_position_head(tmp_path):
    sd = tiny_state()
    mae = official(sd)
    mae.update({"decoder_pred.weight": torch.zeros(48, 32), "decoder_pred.bias": torch.zeros(48),
                "mask_token": torch.zeros(1, 1, 32), "decoder_pos_embed": torch.zeros(1, 17, 32)})
    del mae["mask_pos_token"]
    got = load_as_file({"model": mae}, tmp_path)
    assert same(got.model, encoder_part(sd)) and got.source == "MAE encoder"


def test_timm_state_dict_with_head_loads_encoder(tmp_path):
    sd = encoder_part(tiny_state())
    got = load_as_file({**official(sd), "head.weight": torch.zeros(3, 32)}, tmp_path)
    assert same(got.model, sd) and got.source == "timm encoder"


def test_other_dict_error_names_its_keys(tmp_path):
    with pytest.raises(train.UserError, match=r"a dict with keys \['foo', 'bar'\]"):
        load_as_file({"foo": 1, "bar": torch.zeros(1)}, tmp_path)


def test_garbage_and_truncated_files_are_corrupt(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint" * 8)
    torch.save(tiny_state(), tmp_path / "t.pt")
    (tmp_path / "t.pt").write_bytes((tmp_path / "t.pt").read_bytes()[:1000])
    for f in ("g.pt", "t.pt"):
        with pytest.raises(train.UserError, match="cannot read checkpoint"):
            train.load_checkpoint(tmp_path / f)


def test_missing_file_does_not_exist(tmp_path):
    with pytest.raises(train.UserError, match="does not exist"):
        train.load_checkpoint(tmp_path / "nope.pt")


def test_pickled_foreign_class_is_one_line_error_naming_it(tmp_path):
    torch.save({"when": datetime.date(2024, 1, 1)}, tmp_path / "d.pt")
    with pytest.raises(train.UserError, match=r"datetime\.date") as e:
        train.load_checkpoint(tmp_path / "d.pt")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["sincos", "learnable"])
def test_encoder_shape_finds_sizes_and_pos_embed_kind(kind):
    assert train.encoder_shape(tiny_state(kind)) == dict(
        img_size=16, patch_size=4, dim=32, depth=2, heads=None, pos_embed=kind, decoder_dim=32,
        decoder_depth=1, decoder_heads=None)


@pytest.mark.parametrize("pos_embed", [(1, 17, 48), (17, 32), (1, 16, 32), (1, 13, 32)])  # 16, 12: no square
def test_encoder_shape_refuses_what_does_not_fit_a_vit(pos_embed):
    sd = tiny_state()
    sd["encoder.pos_embed"] = torch.zeros(pos_embed)
    with pytest.raises(train.UserError, match=rf"pos_embed {re.escape(str(pos_embed))} and patch embedding"):
        train.encoder_shape(sd)


def test_a_state_dict_with_a_non_string_key_is_refused(tmp_path):
    enc = {k.removeprefix("encoder."): v for k, v in encoder_part(tiny_state()).items()}
    with pytest.raises(train.UserError, match="is not a checkpoint train.py can read"):
        load_as_file({1: torch.zeros(1), **enc}, tmp_path)


def test_a_timm_dict_with_the_position_decoder_is_not_called_an_encoder(tmp_path):
    assert load_as_file(official(tiny_state()), tmp_path).source == "timm encoder"


def test_an_arch_name_of_another_width_is_not_trusted_for_heads_and_old_flags_defer_to_tensors(tmp_path, capsys):
    sd = tiny_state()  # width 32, 2 heads; "small" would be width 384 with 6 heads
    torch.save({"epoch": 1, "state_dict": official(sd), "model": "DropPos_mae_vit_small_patch4_dec32d1b"},
               tmp_path / "lying.pth")
    args = train.parse_args(EVAL_TINY + ["--evaluate", str(tmp_path / "lying.pth"), *HEADS, "--decoder-heads", "2",
                                         "--output-dir", str(tmp_path / "ev")])
    assert (args.heads, args.decoder_heads) == (2, 2)
    # A train.py checkpoint of a version whose args lack img_size and patch_size: its tensors tell them.
    torch.save({"mode": "pretrain", "args": {"heads": 2, "dim": 32, "depth": 2, "decoder_dim": 32, "decoder_depth": 1,
                                             "decoder_heads": 2}, "model": sd, "epoch": 1}, tmp_path / "old.pt")
    args = train.parse_args(EVAL_TINY + ["--evaluate", str(tmp_path / "old.pt"), "--output-dir", str(tmp_path / "o")])
    assert (args.img_size, args.patch_size) == (16, 4)


def test_resize_same_grid_unchanged_sincos_recomputed_learnable_bicubic():
    pos = tiny_state()["encoder.pos_embed"]  # (1, 17, 32), a 4x4 grid
    assert train.resize_pos_embed(pos, (4, 4), "sincos") is pos
    big = train.resize_pos_embed(pos, (6, 5), "sincos")
    assert torch.equal(big[0, 0], pos[0, 0])
    assert torch.equal(big[0, 1:], droppos.sincos_pos_embed(32, (6, 5)))
    const = torch.full((1, 17, 32), 0.5)
    out = train.resize_pos_embed(const, (7, 7), "learnable")
    assert out.shape == (1, 50, 32) and torch.allclose(out, const[:, :1].expand(1, 50, 32))


def test_arch_facts_of_example_names():
    assert train.arch_facts("DropPos_mae_vit_base_patch16_dec512d2b") == dict(
        name="DropPos_mae_vit_base_patch16_dec512d2b", dim=768, depth=12, heads=12, patch_size=16,
        decoder_dim=512, decoder_depth=2, decoder_heads=16)
    assert train.arch_facts("mae_vit_large_patch16_dec512d8b")["decoder_depth"] == 8
    assert train.arch_facts("mae_vit_large_patch16")["decoder_depth"] == 8  # the recommended alias
    assert train.arch_facts("vit_base_patch16") == dict(name="vit_base_patch16", dim=768, depth=12,
                                                  heads=12, patch_size=16)
    assert train.arch_facts("vit_huge_patch14")["heads"] == 16
    assert train.arch_facts("vit_tiny_patch16")["dim"] == 192
    assert train.arch_facts("resnet50") == {} and train.arch_facts("vit_giant_patch14") == {}


def _foreign_layouts(ck_path, tmp_path):
    """The reference run's weights in every layout another codebase writes.  -> {name: path}."""
    ck = torch.load(ck_path, weights_only=True)
    sd, ns = ck["model"], argparse.Namespace(model="custom", input_size=32, mask_ratio=0.75, pos_mask_ratio=0.75)
    enc = {k.removeprefix("encoder."): v for k, v in encoder_part(sd).items()}
    files = {"official": {"epoch": 3, "state_dict": official(sd, "module."), "optimizer": {}, "model": "custom"},
             "save_model": {"model": official(sd), "optimizer": {}, "epoch": 2, "scaler": {}, "args": ns},
             "mae_encoder": {"model": enc}, "timm": {**enc, "head.weight": torch.zeros(10, 32)}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    return {name: tmp_path / f"{name}.pt" for name in files}


HEADS = ["--heads", "2"]  # what the tensors of a file without flags or arch name cannot tell


@slow
def test_a_run_folder_stands_for_its_checkpoint_and_a_folder_without_one_is_one_line(pretrained_run, tmp_path,
                                                                                     capsys):
    ref_dir, _ = pretrained_run
    for mode in ("--finetune", "--evaluate", "--location-probe", "--linear-probe"):
        assert vars(train.parse_args(ENCODER_TINY[:-2] + [mode, str(ref_dir)]))[mode[2:].replace("-", "_")] == \
            str(ref_dir / "checkpoint.pt")
    line = _fails(ENCODER_TINY[:-2] + ["--evaluate", tmp_path, "--output-dir", tmp_path / "out"], capsys)
    assert "cannot read checkpoint" in line and "Is a directory" in line


@slow
def test_a_probe_runs_checkpoint_is_read_with_its_flags_like_any_train_py_checkpoint(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    _train_in_process(ENCODER_TINY + ["--linear-probe", ref_dir, "--epochs", 1, "--output-dir", tmp_path / "lp"])
    imp = train.imported(tmp_path / "lp" / "checkpoint.pt")
    assert imp.source == "train.py checkpoint" and imp.mode == "linear_probe"
    args = train.parse_args(ENCODER_TINY + ["--finetune", str(tmp_path / "lp")])  # no --heads needed
    assert (args.dim, args.depth, args.heads) == (32, 2, 2)


@slow
def test_evaluate_crops_as_the_checkpoints_recipe_did_unless_told_otherwise(paper_runs):
    _, fine = paper_runs
    args = train.parse_args(["--evaluate", str(fine), "--dataset", "synthetic"])
    assert args.recipe == "paper" and train.eval_crop_pct(args) == 224 / 256
    typed = train.parse_args(["--evaluate", str(fine), "--dataset", "synthetic", "--recipe", "laptop"])
    assert train.eval_crop_pct(typed) == 1.0


def test_a_resumed_run_whose_source_checkpoint_moved_still_names_it(tmp_path):
    args = argparse.Namespace(finetune=str(tmp_path / "gone.pt"), resume=str(tmp_path / "run"), benchmark=False,
                              evaluate=None, location_probe=None, linear_probe=None)
    assert train.source_line(args) == f" from {tmp_path / 'gone.pt'}"  # not read: it may be gone


EVAL_TINY = ENCODER_TINY[:-2]  # --log-every is training's


def _evaluation(argv, out):
    stdout = _train_in_process(EVAL_TINY + argv + ["--output-dir", out])
    assert stdout.startswith("evaluation of ")  # the start-up line every mode says
    line = json.loads(stdout.strip().splitlines()[-1])
    assert json.loads((out / "evaluation.json").read_text()) == line
    return {k: v for k, v in line.items() if k not in ("checkpoint", "source")}


@slow
def test_evaluate_scores_a_checkpoint_and_its_official_layout_alike_and_repeatably(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    files = _foreign_layouts(ref_dir / "checkpoint.pt", tmp_path)
    ours = _evaluation(["--evaluate", ref_dir / "checkpoint.pt"], tmp_path / "a")
    assert ours == _evaluation(["--evaluate", ref_dir / "checkpoint.pt"], tmp_path / "b")  # deterministic
    theirs = _evaluation(["--evaluate", files["official"], *HEADS, "--decoder-heads", "2"], tmp_path / "c")
    assert theirs == ours
    assert ours["test_pos_top1_chance"] == 100 / 64 and 0 <= ours["test_pos_within1"] <= 100
    assert ours["test_pos_distance_chance"] > ours["test_pos_distance"] * 0.5 and "knn_top1" in ours
    with Image.open(tmp_path / "a" / "reassembly.png") as png:
        assert png.format == "PNG"
    # An encoder alone: what needs no position head.
    enc = _evaluation(["--evaluate", files["mae_encoder"], *HEADS], tmp_path / "d")
    assert "test_pos_top1" not in enc and enc["knn_top1"] == ours["knn_top1"]


@slow
def test_finetune_from_every_layout_gives_identical_runs(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    files = _foreign_layouts(ref_dir / "checkpoint.pt", tmp_path)
    sources = {"checkpoint.pt": [ref_dir / "checkpoint.pt"], "encoder.pt": [ref_dir / "encoder.pt", *HEADS]}
    sources.update({name: [path, *HEADS] for name, path in files.items()})
    rows = {}
    for name, (path, *extra) in sources.items():
        out = tmp_path / f"ft-{name}"
        _train_in_process(ENCODER_TINY + ["--finetune", path, *extra, "--epochs", 1, "--output-dir", out])
        rows[name] = _learned_rows(out / "metrics.jsonl")
    assert all(r == rows["checkpoint.pt"] for r in rows.values())


def test_evaluate_reads_the_head_counts_of_an_official_arch_name_and_needs_no_training_batch(tmp_path, capsys):
    # ViT-Small/8 on 16-px images: 6 heads and a 16-head decoder, told by the name alone.
    torch.manual_seed(0)
    model = droppos.DropPos(16, 8, dim=384, depth=1, heads=6, decoder_dim=64, decoder_depth=1, decoder_heads=16)
    torch.save({"epoch": 1, "state_dict": official(model.state_dict(), "module."),
                "model": "DropPos_mae_vit_small_patch8_dec64d1b"}, tmp_path / "official.pth")
    argv = ["--evaluate", tmp_path / "official.pth", "--img-size", 16, "--synthetic-size", 20, "--batch-size", 64]
    line = _evaluation(argv, tmp_path / "ev")
    assert line["epoch"] == 1 and line["test_pos_top1_chance"] == 100 / 4
    # No overwrite: a folder holding an evaluation refuses a new one.
    assert "already holds a run (evaluation.json)" in _fails(EVAL_TINY + argv + ["--output-dir", tmp_path / "ev"],
                                                             capsys)


@slow
def test_evaluate_of_a_fine_tuning_checkpoint_gives_its_test_top1(pretrained_run, tmp_path):
    ft = tmp_path / "ft"
    _train_in_process(ENCODER_TINY + ["--finetune", pretrained_run[0] / "checkpoint.pt", "--epochs", 1,
                                      "--output-dir", ft])
    last = [r for r in _metrics(ft / "metrics.jsonl") if r.get("summary")][-1]
    line = _evaluation(["--evaluate", ft / "checkpoint.pt"], tmp_path / "ev")
    assert line["test_top1"] == last["test_top1"] and "test_pos_top1" not in line and "knn_top1" in line


def test_a_file_of_another_kind_and_a_contradicted_heads_are_one_line(pretrained_run, tmp_path, capsys):
    ref_dir, _ = pretrained_run
    torch.save({"weights": torch.zeros(3), "step": 7}, tmp_path / "other.pt")
    out = ["--output-dir", tmp_path / "out"]
    line = _fails(ENCODER_TINY + ["--finetune", tmp_path / "other.pt"] + out, capsys)
    assert "['weights', 'step']" in line and "corrupt" not in line
    assert "--heads 3 differs from the encoder" in _fails(
        EVAL_TINY + ["--evaluate", ref_dir / "checkpoint.pt", "--heads", "3"] + out, capsys)
    assert "pass --heads" in _fails(ENCODER_TINY + ["--location-probe", ref_dir / "encoder.pt"] + out, capsys)


@slow
@pytest.mark.parametrize("pos_embed", ["sincos", "learnable"])
def test_finetuning_at_another_image_size_resizes_the_position_embedding(pos_embed, tmp_path):
    pre = tmp_path / "pre"
    _train_in_process(TRAIN_TINY + ["--epochs", 1, "--pos-embed", pos_embed, "--output-dir", pre])
    _train_in_process(ENCODER_TINY + ["--finetune", pre / "checkpoint.pt", "--img-size", 48, "--epochs", 1,
                                      "--output-dir", tmp_path / "ft"])
    model = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["model"]
    assert model["encoder.pos_embed"].shape == (1, 1 + 12 * 12, 32)


# --------------------------------------------------------------------------------------------
# 8. The run folder: one live run, whole files, exact resume
# --------------------------------------------------------------------------------------------

@slow
def test_a_new_run_into_a_folder_holding_a_run_refuses_and_touches_nothing(run_copy, capsys):
    before = _snapshot(run_copy)
    line = _fails(TRAIN_TINY + ["--epochs", TRAIN_EPOCHS, "--output-dir", run_copy], capsys)
    assert "already holds a run" in line and f"python train.py --resume {run_copy}" in line
    assert _snapshot(run_copy) == before


@slow
def test_two_runs_started_together_into_one_folder_one_trains_the_other_refuses_naming_it(tmp_path):
    out_dir = tmp_path / "same"
    argv = TRAIN_TINY + ["--epochs", 2, "--output-dir", out_dir]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    procs = [_start_train(argv, tmp_path / d) for d in "ab"]
    for p in procs:
        _wait(p)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], codes
    loser = next(d for d, p in zip("ab", procs) if p.returncode == 2)
    line = (tmp_path / loser / "stderr.txt").read_text().strip()
    winner_pid = next(p.pid for p in procs if p.returncode == 0)
    assert line.startswith("error: ") and "\n" not in line and f"pid {winner_pid}" in line, line
    steps = [r["step"] for r in _metrics(out_dir / "metrics.jsonl") if not r.get("summary")]
    assert steps == list(range(1, 2 * TRAIN_STEPS_PER_EPOCH + 1))  # one run's rows, once


@slow
def test_a_second_run_into_a_live_runs_folder_refuses_naming_it_and_touches_nothing(tmp_path, capsys):
    # A run still in its first epoch (no checkpoint yet): a new run may not go in.
    long_epoch = TRAIN_TINY + ["--synthetic-size", 8000, "--epochs", 2, "--output-dir", tmp_path / "run"]
    proc = _start_train(long_epoch, tmp_path)
    try:
        _wait_for_step_of_epoch(proc, tmp_path / "run" / "metrics.jsonl", epoch=1)
        assert f"pid {proc.pid}" in _fails(long_epoch, capsys)
        assert proc.poll() is None  # still training
    finally:
        proc.kill()
        proc.wait()


@slow
def test_resume_into_a_live_runs_folder_is_refused_naming_the_live_run(run_copy, capsys):
    before = _snapshot(run_copy)
    (run_copy / ".lock").write_text("pid 1: train.py --epochs 9")
    fd = os.open(run_copy / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by "another" open file, as a live process holds it
    try:
        assert "live run (pid 1: train.py --epochs 9)" in _fails(["--resume", run_copy], capsys)
    finally:
        os.close(fd)
    assert {k: v for k, v in _snapshot(run_copy).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


def test_a_lock_left_by_a_killed_run_blocks_nothing_and_a_live_one_is_named(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("pid 999999: train.py\n")  # written by a process now dead
    args = argparse.Namespace(output_dir=str(folder), resume=str(folder))
    with train.FolderLock(args):  # taken over without complaint, and named while held
        with pytest.raises(train.UserError, match=f"live run \\(pid {os.getpid()}: "):
            train.FolderLock(args).__enter__()
    with train.FolderLock(args):  # given back when its holder ends
        pass


def _busy(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


@pytest.mark.parametrize("flags, chosen", [({"avx512_bf16", "avx2"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                           ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_precision_auto_follows_the_cpus_bf16_units_the_same_on_every_start_under_load(flags, chosen,
                                                                                         monkeypatch):
    import threading
    monkeypatch.setattr(train, "cpu_flags", lambda: flags)
    stop = threading.Event()
    busy = [threading.Thread(target=_busy, args=(stop,)) for _ in range(2)]
    for t in busy:
        t.start()
    try:
        picks = {train.pick_precision("auto", torch.device("cpu"))[0] for _ in range(30)}
    finally:
        stop.set()
    assert picks == {chosen}
    assert train.pick_precision("fp32", torch.device("cpu"))[0] == "fp32"


def test_threads_are_one_per_core_no_other_process_keeps_busy_and_omp_num_threads_wins(
        monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for busy, threads in [(0, 2), (1, 1), (2, 1)]:
            torch.set_num_threads(2)  # torch's default on a 2-core machine
            monkeypatch.setattr(train, "busy_cores", lambda: busy)
            assert train.pick_threads().startswith(f"{threads} thread")
            assert torch.get_num_threads() == threads
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what the user pinned is kept as it is
        assert train.pick_threads() == "2 threads (OMP_NUM_THREADS)"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_setaffinity"),
                    reason="reads Linux's /proc/stat")
def test_a_core_another_process_spins_on_counts_as_busy():
    core = min(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})"
                             "\nwhile True: pass"])
    try:
        time.sleep(0.5)  # the child has pinned itself and spins
        assert train.busy_cores() >= 1
    finally:
        spin.kill()
        spin.wait()


def test_cpu_flags_are_read_from_the_operating_system():
    flags = train.cpu_flags()
    if Path("/proc/cpuinfo").exists() and "flags" in Path("/proc/cpuinfo").read_text():
        assert flags and all(isinstance(f, str) and " " not in f for f in flags)


def test_precision_is_in_the_start_up_line_and_the_checkpoint(pretrained_run):
    out_dir, stdout = pretrained_run
    assert "fp32 (asked for)" in stdout.splitlines()[0]
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["precision"] == "fp32"


# A flag that would change the run, and its value in the reference run.
CHANGING_FLAGS = [("--epochs", "5", 3), ("--batch-size", "8", 16), ("--mask-ratio", "0.5", 0.75),
                  ("--dataset", "cifar10", "synthetic"), ("--seed", "1", 0), ("--sigma", "0", 1.0),
                  ("--no-attentive", None, False), ("--pos-embed", "learnable", "sincos"),
                  ("--finetune", "scratch", None)]


@pytest.mark.parametrize("name, value, saved", CHANGING_FLAGS, ids=[c[0] for c in CHANGING_FLAGS])
@slow
def test_resume_refuses_a_flag_that_would_change_the_run_naming_both_values(name, value, saved, run_copy, capsys):
    before = _snapshot(run_copy)
    argv = ["--resume", run_copy, name] + ([value] if value is not None else [])
    line = _fails(argv, capsys)
    assert f"{name} would change the run" in line and f"started with {saved!r}" in line
    assert _snapshot(run_copy) == before


@slow
def test_resume_accepts_flags_that_change_nothing_learned(run_copy, capsys):
    stdout = _train_in_process(["--resume", run_copy / "checkpoint.pt", "--log-every", "2", "--workers", "0",
                                "--knn-every", "5", "--device", "cpu", "--precision", "fp32",
                                "--output-dir", run_copy])
    assert "is complete" in stdout


@slow
def test_resume_from_a_checkpoint_path_writes_only_into_its_own_folder(run_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _train_in_process(["--resume", run_copy / "checkpoint.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no runs/<dataset>-pretrain
    assert "in its own folder" in _fails(["--resume", run_copy, "--output-dir", tmp_path / "other"], capsys)


@slow
def test_resuming_a_finished_run_says_it_is_complete_and_changes_nothing(run_copy):
    before = _snapshot(run_copy)
    assert "is complete (3 epochs)" in _train_in_process(["--resume", run_copy])
    assert {k: v for k, v in _snapshot(run_copy).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the last good one")

    def full_disk(f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        train.atomic_write(path, full_disk)
    assert path.read_bytes() == b"the last good one"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@slow
def test_a_disk_that_fills_mid_run_ends_in_one_line_and_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the disk fills once the first epoch's checkpoint is written
        calls.append(fd)
        if (out_dir / "checkpoint.pt").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    line = _fails(TRAIN_TINY + ["--epochs", TRAIN_EPOCHS, "--output-dir", out_dir], capsys)
    assert "No space left on device" in line
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0)
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_unwritable_output_folder_is_one_line(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run",
           "read-only": tmp_path / "ro"}[case]
    if case == "read-only":  # as root, permissions do not stop a write: the file system must
        real_open = open

        def read_only_open(path, mode="r", *a, **kw):
            if "w" in mode and str(path).startswith(str(out)):
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(path, mode, *a, **kw)

        monkeypatch.setattr(train, "open", read_only_open, raising=False)
    line = _fails(TRAIN_TINY + ["--epochs", 1, "--output-dir", out], capsys)
    assert {"a file": "File exists", "under a file": "Not a directory",
            "read-only": "Read-only file system"}[case] in line and str(out) in line


# --------------------------------------------------------------------------------------------
# 9. Processes: torchrun, stopping together, RNG streams
# --------------------------------------------------------------------------------------------

@slow
def test_two_process_gloo_run_under_torchrun_writes_once_from_rank_0_and_runs_knn(tmp_path):
    out_dir = tmp_path / "run"
    epochs = 2
    code, stdout, stderr = _run_train_cli(TRAIN_TINY + ["--epochs", epochs, "--knn-every", 1, "--output-dir", out_dir],
                                          tmp_path, torchrun=True)
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    # Only rank 0 prints and writes: one header, one summary per epoch, every step once.
    assert stdout.count("2 process(es)") == 1
    records = _metrics(out_dir / "metrics.jsonl")
    summaries = [r for r in records if r.get("summary")]
    assert [r["epoch"] for r in summaries] == list(range(1, epochs + 1))
    assert all(0 <= r["knn_top1"] <= 100 for r in summaries)  # every process embedded its share
    per_rank_steps = TRAIN_STEPS_PER_EPOCH // 2  # each process sees half of every epoch
    assert [r["step"] for r in records if not r.get("summary")] == list(range(1, epochs * per_rank_steps + 1))
    assert {p.name for p in out_dir.iterdir()} == {"metrics.jsonl", "checkpoint.pt", "encoder.pt", "reassembly.png",
                                                   "curves.png", ".lock"}
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (epochs, 0)
    assert len(ck["ranks"]) == 2  # both processes' random state, for an exact resume


@slow
def test_a_non_finite_loss_under_torchrun_stops_every_process_at_the_same_step(tmp_path):
    start = time.monotonic()
    code, _, stderr = _run_train_cli(TRAIN_TINY + ["--epochs", 3, "--blr", "1e9", "--log-every", "1000",
                                                   "--output-dir", tmp_path / "run"], tmp_path, torchrun=True)
    assert code != 0 and time.monotonic() - start < 120
    stops = re.findall(r"error: the loss became non-finite in epoch (\d+) at step (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]


@slow
def test_sigterm_under_torchrun_saves_a_checkpoint_of_every_process_within_seconds(tmp_path):
    proc, out_dir = _start_and_reach_second_epoch(tmp_path, torchrun=True, epochs=50)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    _wait(proc, timeout=60)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert time.monotonic() - sent < 30, stderr[-3000:]
    assert "interrupted: saved" in stderr
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] >= 1 and len(ck["ranks"]) == 2


def test_per_image_augmentation_leaves_the_global_cpu_and_cuda_rngs_untouched():
    ds = train.SeededTransform(train.SyntheticImages(4, 32), train.train_transform(32), seed=0)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    first = ds[1][0]
    assert torch.equal(torch.get_rng_state(), cpu)
    if cuda is not None:  # the CUDA half runs where a GPU is
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))
    torch.rand(5)  # whatever the training step draws in between
    assert torch.equal(ds[1][0], first)  # the crop depends on (seed, epoch, image) only


# --------------------------------------------------------------------------------------------
# 14. Benchmark
# --------------------------------------------------------------------------------------------

@slow
def test_benchmark_prints_one_json_line_with_throughput_memory_flops_and_utilization(tmp_path):
    i = TRAIN_TINY.index("--knn-every")  # it and --log-every are a run's flags, refused here
    bench_tiny = TRAIN_TINY[:i] + TRAIN_TINY[i + 2:-2]
    # Its own process: memory is the growth of resident memory, which a process that has already
    # held more (this one, after other tests) keeps and reuses without growing.
    stdout = subprocess.run(
        [sys.executable, "train.py", *map(str, bench_tiny), "--benchmark"], cwd=TRAIN_DIR, env=_train_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT, check=True).stdout
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("images_per_sec", "peak_memory_mb", "gflops_per_image", "utilization", "images_per_sec_with_data"):
        assert result[key] > 0, key
    assert result["gflops_per_image"] == round(train.droppos_flops(train.model_config(
        train.parse_args(TRAIN_TINY))) / 1e9, 3)


def test_droppos_flops_grow_linearly_with_depth_and_drop_without_attentive_pass():
    cfg = train.model_config(train.parse_args(TRAIN_TINY))
    flops = lambda **kw: train.droppos_flops(dict(cfg, **kw))
    # Each encoder block adds the same amount (training pass plus the attentive forward).
    assert flops(depth=3) - flops(depth=2) == flops(depth=2) - flops(depth=1) > 0
    assert flops(attentive=False) < flops()
    # Fewer visible patches, less work.
    assert flops(mask_ratio=0.75) < flops(mask_ratio=0.5)
