"""Property-based tests for DropPos (SPEC §4): run `python -m pytest -q`.

Everything runs in fp32 on the CPU with tiny models, so the whole file stays fast on a laptop.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout
from functools import partial
from io import StringIO
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import droppos
import train

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
    # The SPEC's counting rule, written out independently of droppos.py.
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

@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 3), C=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5),
       p=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_unpatchify_inverts_patchify(B, C, h, w, p, seed):
    x = torch.randn(B, C, h * p, w * p, generator=torch.Generator().manual_seed(seed))
    patches = patchify(x, p)
    assert patches.shape == (B, h * w, p * p * C)
    assert torch.equal(unpatchify(patches, p, (h, w)), x)


@settings(deadline=None, max_examples=30)
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


@settings(deadline=None, max_examples=15)
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
# Argument checking (SPEC §3: ValueError naming the argument)
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=40)
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


@settings(deadline=None, max_examples=60)
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


@settings(deadline=None, max_examples=60)
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

@settings(deadline=None, max_examples=50)
@given(batch=st.integers(1, 6), n=st.integers(1, 80), data=st.data())
def test_random_masking_indices_are_unique_and_in_range(batch, n, data):
    keep = data.draw(st.integers(1, n))
    ids = random_masking(batch, n, keep)
    assert ids.shape == (batch, keep) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < n
    assert all(len(set(row.tolist())) == keep for row in ids)


@settings(deadline=None, max_examples=30)
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

@settings(deadline=None, max_examples=40)
@given(batch=st.integers(1, 6), n_vis=st.integers(1, 60), data=st.data())
def test_drop_positions_drops_exactly_n_vis_minus_n_keep_per_row(batch, n_vis, data):
    n_keep = data.draw(st.integers(0, n_vis - 1))
    dropped = drop_positions(batch, n_vis, n_keep)
    assert dropped.shape == (batch, n_vis) and dropped.dtype == torch.bool
    assert (dropped.sum(1) == n_vis - n_keep).all()


def test_drop_positions_differ_across_samples():
    dropped = drop_positions(8, 64, 32)
    assert len({tuple(r) for r in dropped.tolist()}) == 8


@settings(deadline=None, max_examples=10)
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

@settings(deadline=None, max_examples=30)
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


@settings(deadline=None, max_examples=10)
@given(h=st.integers(1, 4), w=st.integers(1, 4), p=st.sampled_from([2, 4]),
       B=st.integers(1, 3))
def test_forward_features_returns_cls_plus_every_patch(h, w, p, B):
    enc = ViT((h * p, w * p), p, dim=16, depth=1, heads=2)
    assert enc.forward_features(torch.randn(B, 3, h * p, w * p)).shape == (B, 1 + h * w, 16)


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

@settings(deadline=None, max_examples=10)
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


@settings(deadline=None, max_examples=40)
@given(grid=grids, sigma=st.one_of(st.just(0.0), sigmas))
def test_targets_rows_sum_to_one(grid, sigma):
    t = gaussian_position_targets(grid, sigma)
    N = grid[0] * grid[1]
    assert t.shape == (N, N)
    assert (t >= 0).all()
    torch.testing.assert_close(t.sum(1), torch.ones(N), atol=1e-5, rtol=0)


@settings(deadline=None, max_examples=40)
@given(grid=grids, sigma=st.one_of(st.just(0.0), sigmas))
def test_targets_peak_on_the_diagonal(grid, sigma):
    t = gaussian_position_targets(grid, sigma)
    diag = t.diagonal()
    off = t.masked_fill(torch.eye(len(t), dtype=torch.bool), -1.0)
    assert (diag[:, None] > off).all()


@settings(deadline=None, max_examples=20)
@given(grid=grids)
def test_targets_are_one_hot_at_sigma_zero(grid):
    N = grid[0] * grid[1]
    assert torch.equal(gaussian_position_targets(grid, 0.0), torch.eye(N))


@settings(deadline=None, max_examples=40)
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


@settings(deadline=None, max_examples=40)
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


@settings(deadline=None, max_examples=40)
@given(sigma0=st.floats(0.0, 5.0), progress=st.floats(-1.0, 2.0))
def test_sigma_decays_linearly_from_sigma0_to_zero(sigma0, progress):
    clamped = min(max(progress, 0.0), 1.0)
    assert sigma_at(sigma0, progress) == pytest.approx(sigma0 * (1 - clamped))
    assert sigma_at(sigma0, 0.0) == sigma0 and sigma_at(sigma0, 1.0) == 0.0
    assert sigma_at(sigma0, progress, decay=False) == sigma0


# --------------------------------------------------------------------------------------------
# 7. Attentive reconstruction
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=10)
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


@settings(deadline=None, max_examples=60)
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


@settings(deadline=None, max_examples=40)
@given(inp=loss_inputs())
def test_loss_equals_cross_entropy_at_sigma_zero_with_uniform_weights(inp):
    logits, _, dropped, ids, _ = inp
    N = logits.shape[-1]
    one_hot = gaussian_position_targets((1, N), 0.0)[ids]
    expected = F.cross_entropy(logits[dropped], ids[dropped])
    torch.testing.assert_close(position_loss(logits, one_hot, dropped), expected,
                               atol=1e-5, rtol=1e-5)


@settings(deadline=None, max_examples=40)
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


@settings(deadline=None, max_examples=40)
@given(inp=loss_inputs(), use_weights=st.booleans(), seed=st.integers(0, 2**16))
def test_loss_ignores_tokens_whose_position_was_kept(inp, use_weights, seed):
    logits, targets, dropped, _, _ = inp
    weights = torch.rand(dropped.shape) + 0.1 if use_weights else None
    noise = 50 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    changed = torch.where(dropped.unsqueeze(-1), logits, logits + noise)
    assert torch.equal(position_loss(logits, targets, dropped, weights),
                       position_loss(changed, targets, dropped, weights))


@settings(deadline=None, max_examples=40)
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

@settings(deadline=None, max_examples=40)
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


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
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


@settings(deadline=None, max_examples=10)
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
    # read it); the SPEC asks for random order, independently per image.
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


@settings(deadline=None, max_examples=10)
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


@settings(deadline=None, max_examples=10)
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
# Tests of train.py, the command-line program (SPEC §5). A tiny ViT on the offline synthetic set, fp32
# (bf16 on a CPU without bf16 units is ~100x slower), one thread, no loader processes, so a whole
# epoch takes well under a second. In-process `train.main([...])` wherever that is enough;
# subprocesses only where the process boundary is the point (SIGKILL, Ctrl-C, torchrun, "no
# traceback" from the real command line).

TRAIN_DIR = Path(train.__file__).resolve().parent
# 256 images / batch 16 = 16 steps per epoch: enough steps that a run can be interrupted
# mid-epoch reliably, few enough that 3 epochs take a few seconds.
TRAIN_STEPS_PER_EPOCH = 16
TRAIN_TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "16",
              "--dim", "32", "--depth", "2", "--heads", "2",
              "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
              "--knn-every", "0", "--precision", "fp32", "--workers", "0", "--device", "cpu",
              "--log-every", "0"]  # a progress line and a metrics.jsonl line for every step
TRAIN_EPOCHS = 3
SUBPROCESS_TIMEOUT = 300  # seconds; generous because the cores are shared with other work


def _train_in_process(argv):
    """train.main(argv) in this process; returns what it printed on stdout."""
    out = StringIO()
    # One thread, as the subprocesses (OMP_NUM_THREADS=1): the exact-resume tests compare
    # weights bit for bit across the two.
    with one_thread(), redirect_stdout(out):
        train.main([str(a) for a in argv])
    return out.getvalue()


def _train_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _start_train(argv, log_dir, **env):
    """train.py as its own process; stdout and stderr go to files (a pipe nobody reads could
    fill up and block it)."""
    out, err = open(log_dir / "stdout.txt", "w"), open(log_dir / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=TRAIN_DIR,
                            env=_train_env(**env), stdout=out, stderr=err)
    out.close()
    err.close()
    return proc


def _run_train_cli(argv, log_dir, **env):
    """train.py run to its end: (exit code, stdout, stderr)."""
    proc = _start_train(argv, log_dir, **env)
    try:
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (log_dir / "stdout.txt").read_text(), (log_dir / "stderr.txt").read_text()


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _wait_for_step_of_epoch(proc, metrics_path, epoch, timeout=SUBPROCESS_TIMEOUT):
    """Poll metrics.jsonl until a step line of `epoch` (0-based) is there."""
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
                if rec.get("epoch") == epoch and "step" in rec:
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


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """One uninterrupted 3-epoch pre-training run: the reference for the resume tests, and the
    checkpoint that the fine-tuning and bad-checkpoint tests start from."""
    out_dir = tmp_path_factory.mktemp("pretrain")
    stdout = _train_in_process(TRAIN_TINY + ["--epochs", TRAIN_EPOCHS, "--output-dir", out_dir])
    return out_dir, stdout


# --------------------------------------------------------------------------------------------
# 1. Training data: CIFAR-size sets in memory with batched augmentation, photos per image
# --------------------------------------------------------------------------------------------

def _image_folder(root, size, per_class=8, classes=("cat", "dog")):
    """An ImageFolder of random size×size PNGs."""
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            torchvision.utils.save_image(torch.rand(3, size, size, generator=g), root / c / f"{i}.png")
    return root


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


@settings(deadline=None, max_examples=40)
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


@settings(deadline=None, max_examples=30)
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
    stream = train.TrainStream(train_set, args, 0, 1, False, torch.device("cpu"))
    assert stream.in_memory is in_memory
    epoch0 = list(stream.epoch(0))
    assert len(epoch0) == stream.steps == len(train_set) // 4
    for imgs, labels in epoch0:
        assert imgs.shape == (4, 3, 32, 32) and imgs.dtype == torch.float32 and labels.shape == (4,)
        pixels = imgs * torch.tensor(train.STD).view(3, 1, 1) + torch.tensor(train.MEAN).view(3, 1, 1)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # A resumed epoch sees exactly the crops of an uninterrupted one; the next epoch new ones.
    for (a, y), (b, z) in zip(epoch0[2:], stream.epoch(0, start_step=2), strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)
    assert not torch.equal(epoch0[0][0], next(iter(stream.epoch(1)))[0])


# --------------------------------------------------------------------------------------------
# 2. An end-to-end run and what it leaves behind
# --------------------------------------------------------------------------------------------

# read_image warns that torchvision's image I/O is deprecated (in favour of torchcodec); it still works.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pretraining_run_writes_metrics_checkpoint_timm_encoder_and_picture(pretrained_run):
    out_dir, stdout = pretrained_run
    assert {p.name for p in out_dir.iterdir()} == {"metrics.jsonl", "checkpoint.pt", "encoder.pt",
                                                   "reassembly.png"}  # no .tmp left behind

    # metrics.jsonl: one JSON object per line; with --log-every 0 one line per step, and one
    # summary per epoch.
    records = _metrics(out_dir / "metrics.jsonl")
    steps = [r for r in records if not r.get("summary")]
    summaries = [r for r in records if r.get("summary")]
    assert [r["step"] for r in steps] == list(range(1, TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in summaries] == list(range(TRAIN_EPOCHS))
    for r in steps:
        assert {"epoch", "loss", "acc", "lr", "sigma", "images_per_sec"} <= r.keys()
        assert math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 and r["lr"] > 0 and r["sigma"] >= 0
    for r in summaries:
        assert math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1
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

    # reassembly.png: a real PNG of 3 rows (originals, visible patches, re-assembled) of 8
    # held-out 32-px images, 1-px padding.
    png = out_dir / "reassembly.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = torchvision.io.read_image(str(png))
    assert img.shape == (3, 3 * 33 + 1, 8 * 33 + 1)

    # A progress line a person can follow.
    line = re.compile(r"epoch \d+/3 +step \d+/16 +loss \d+\.\d+ +pos-acc \d+\.\d+% +lr \d\.\d+e[-+]\d+ +"
                      r"σ \d\.\d+ +\d+ img/s +left \d+:\d\d:\d\d")
    assert len(line.findall(stdout)) == TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH


# --------------------------------------------------------------------------------------------
# 3. Interruptions: SIGKILL and Ctrl-C, then --resume
# --------------------------------------------------------------------------------------------

def _start_and_reach_second_epoch(tmp_path):
    """A subprocess run of the reference arguments, returned once it is inside epoch 1."""
    out_dir = tmp_path / "run"
    argv = TRAIN_TINY + ["--epochs", TRAIN_EPOCHS, "--output-dir", out_dir]
    proc = _start_train(argv, tmp_path)
    _wait_for_step_of_epoch(proc, out_dir / "metrics.jsonl", epoch=1)
    return proc, argv, out_dir


def test_resume_after_sigkill_mid_epoch_reproduces_the_uninterrupted_run(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    proc, argv, out_dir = _start_and_reach_second_epoch(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved at the kill
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # What survives is the intact end-of-epoch-0 checkpoint (written to a temporary, renamed).
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0)

    stdout = _train_in_process(argv + ["--resume"])
    assert "resumed from" in stdout
    _assert_same_training_state(ref_dir / "checkpoint.pt", out_dir / "checkpoint.pt")


def test_ctrl_c_mid_epoch_saves_exits_130_without_traceback_and_resume_is_exact(pretrained_run, tmp_path):
    ref_dir, _ = pretrained_run
    proc, argv, out_dir = _start_and_reach_second_epoch(tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "--resume" in lines[0], stderr
    # Saved at the step it stopped at, in the middle of epoch 1 (not at an epoch boundary).
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and 0 < ck["step_in_epoch"] < TRAIN_STEPS_PER_EPOCH
    assert f"epoch 1 step {ck['step_in_epoch']}" in lines[0]

    _train_in_process(argv + ["--resume"])
    _assert_same_training_state(ref_dir / "checkpoint.pt", out_dir / "checkpoint.pt")


# --------------------------------------------------------------------------------------------
# 4. Bad input: one line starting with "error:", a non-zero exit, never a traceback
# --------------------------------------------------------------------------------------------

def _bad_files(tmp_path, ref_dir):
    """Paths the bad-input cases refer to, created on demand."""
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                    .numpy().tobytes())
    real = (ref_dir / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(real[: len(real) // 2])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # a valid torch file, but no checkpoint
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "some_class").mkdir(parents=True)
    return {"random": rnd, "truncated": tmp_path / "truncated.pt", "tensor": tmp_path / "tensor.pt",
            "empty": tmp_path / "empty", "no_images": tmp_path / "no_images", "missing": tmp_path / "missing",
            "ckpt": ref_dir / "checkpoint.pt", "encoder": ref_dir / "encoder.pt"}


# (argv built from the paths above, a phrase the message must contain)
BAD_INPUTS = [
    pytest.param(lambda f: ["--dataset", "mnist"], "unknown dataset 'mnist'", id="unknown-dataset"),
    pytest.param(lambda f: ["--dataset", "imagefolder", "--data-dir", f["missing"]], "does not exist",
                 id="imagefolder-missing-folder"),
    pytest.param(lambda f: ["--dataset", "imagefolder", "--data-dir", f["empty"]], "holds no images",
                 id="imagefolder-empty-folder"),
    pytest.param(lambda f: ["--dataset", "imagefolder", "--data-dir", f["no_images"]], "holds no images",
                 id="imagefolder-class-folder-without-images"),
    pytest.param(lambda f: TRAIN_TINY + ["--patch-size", "5"], "multiple of patch_size", id="patch-not-dividing"),
    pytest.param(lambda f: TRAIN_TINY + ["--img-size", "30", "--patch-size", "4"], "multiple of patch_size",
                 id="img-size-not-divisible"),
    pytest.param(lambda f: TRAIN_TINY + ["--patch-size", "5", "--finetune", "scratch"], "multiple of patch_size",
                 id="patch-not-dividing-finetune"),
    pytest.param(lambda f: TRAIN_TINY + ["--mask-ratio", "1.0"], "mask_ratio", id="mask-ratio-1"),
    pytest.param(lambda f: TRAIN_TINY + ["--mask-ratio", "-0.1"], "mask_ratio", id="mask-ratio-negative"),
    pytest.param(lambda f: TRAIN_TINY + ["--pos-mask-ratio", "0"], "pos_mask_ratio", id="pos-mask-ratio-0"),
    pytest.param(lambda f: TRAIN_TINY + ["--pos-mask-ratio", "1.5"], "pos_mask_ratio", id="pos-mask-ratio-above-1"),
    pytest.param(lambda f: TRAIN_TINY + ["--batch-size", "0"], "--batch-size", id="batch-size-0"),
    pytest.param(lambda f: TRAIN_TINY + ["--batch-size", "1000"], "fewer than one batch", id="batch-above-dataset"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["missing"]], "does not exist", id="resume-missing"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["random"]], "corrupt", id="resume-random-bytes"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["truncated"]], "corrupt", id="resume-truncated"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["tensor"]], "not a training checkpoint",
                 id="resume-not-a-checkpoint"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["ckpt"], "--dim", "64"], "does not match",
                 id="resume-wider-model"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["ckpt"], "--pos-embed", "learnable"], "does not match",
                 id="resume-other-parameters"),
    pytest.param(lambda f: TRAIN_TINY + ["--resume", f["ckpt"], "--finetune", "scratch"], "pretrain",
                 id="resume-pretraining-checkpoint-as-finetuning"),
    pytest.param(lambda f: TRAIN_TINY + ["--finetune", f["missing"]], "does not exist", id="finetune-missing"),
    pytest.param(lambda f: TRAIN_TINY + ["--finetune", f["random"]], "corrupt", id="finetune-random-bytes"),
    pytest.param(lambda f: TRAIN_TINY + ["--finetune", f["truncated"]], "corrupt", id="finetune-truncated"),
    pytest.param(lambda f: TRAIN_TINY + ["--finetune", f["tensor"]], "does not match", id="finetune-not-a-checkpoint"),
    pytest.param(lambda f: TRAIN_TINY + ["--finetune", f["ckpt"], "--dim", "64"], "does not match",
                 id="finetune-wider-model"),
    pytest.param(lambda f: TRAIN_TINY + ["--finetune", f["encoder"], "--patch-size", "8"], "does not match",
                 id="finetune-encoder-other-patch-size"),
    pytest.param(lambda f: TRAIN_TINY + ["--dim", "30"], "multiple of 4", id="width-without-sincos"),
    pytest.param(lambda f: TRAIN_TINY + ["--heads", "3"], "multiple of the number of heads", id="heads-not-dividing"),
    pytest.param(lambda f: TRAIN_TINY + ["--tau", "0"], "tau", id="tau-0"),
    pytest.param(lambda f: TRAIN_TINY + ["--device", "cuda"], "CUDA", id="cuda-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")),
]


@pytest.mark.parametrize("make_argv, phrase", BAD_INPUTS)
def test_bad_input_gives_one_error_line_and_exit_2(make_argv, phrase, pretrained_run, tmp_path, capsys):
    argv = make_argv(_bad_files(tmp_path, pretrained_run[0])) + ["--output-dir", tmp_path / "out"]
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
        _train_in_process(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0]


def test_non_finite_loss_stops_with_error_and_keeps_last_good_checkpoint(pretrained_run, tmp_path, capsys):
    # Resume the finished reference run for one more epoch at an absurd lr: the loss blows up, the
    # run stops with one line, and checkpoint.pt is still the last good one, byte for byte.
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    good = (pretrained_run[0] / "checkpoint.pt").read_bytes()
    (out_dir / "checkpoint.pt").write_bytes(good)
    argv = TRAIN_TINY + ["--epochs", TRAIN_EPOCHS + 1, "--blr", "1e9", "--output-dir", out_dir, "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        _train_in_process(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0]
    assert (out_dir / "checkpoint.pt").read_bytes() == good


@pytest.mark.parametrize("case", ["unknown-dataset", "corrupt-checkpoint", "cifar-download-fails"])
def test_bad_input_on_the_command_line_prints_no_traceback(case, tmp_path):
    # The real program in its own process: what a user would see in the terminal.
    env = {}
    if case == "unknown-dataset":
        argv, phrase = ["--dataset", "mnist"], "unknown dataset"
    elif case == "corrupt-checkpoint":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint" * 100)
        argv, phrase = TRAIN_TINY + ["--resume", tmp_path / "bad.pt"], "corrupt"
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


# --------------------------------------------------------------------------------------------
# 5. Two CPU processes under torchrun (gloo)
# --------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_under_torchrun_writes_once_from_rank_0(tmp_path):
    out_dir = tmp_path / "run"
    epochs = 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "train.py",
           *map(str, TRAIN_TINY + ["--epochs", epochs, "--output-dir", out_dir])]
    proc = subprocess.run(cmd, cwd=TRAIN_DIR, env=_train_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Only rank 0 prints and writes: one header, one summary per epoch, every step once.
    assert proc.stdout.count("2 process(es)") == 1
    records = _metrics(out_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records if r.get("summary")] == list(range(epochs))
    per_rank_steps = TRAIN_STEPS_PER_EPOCH // 2  # each process sees half of every epoch
    assert [r["step"] for r in records if not r.get("summary")] == list(range(1, epochs * per_rank_steps + 1))
    assert {p.name for p in out_dir.iterdir()} == {"metrics.jsonl", "checkpoint.pt", "encoder.pt", "reassembly.png"}
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (epochs, 0)
    assert len(ck["rng"]) == 2  # both processes' random state, for an exact resume


# --------------------------------------------------------------------------------------------
# 6. k-NN monitor
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


def test_knn_monitor_reports_top1_at_the_end_of_pretraining(tmp_path):
    out_dir = tmp_path / "run"
    stdout = _train_in_process(TRAIN_TINY + ["--knn-every", 1, "--epochs", 1, "--output-dir", out_dir])
    assert re.search(r"knn_top1 \d+\.\d\d%", stdout), stdout
    summary = [r for r in _metrics(out_dir / "metrics.jsonl") if r.get("summary")]
    assert len(summary) == 1 and 0 <= summary[0]["knn_top1"] <= 100


# --------------------------------------------------------------------------------------------
# 7. Fine-tuning
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["checkpoint.pt", "encoder.pt"])
def test_finetune_classifier_starts_from_the_pretrained_encoder(source, pretrained_run):
    ref_dir, _ = pretrained_run
    pretrained = torch.load(ref_dir / "encoder.pt", weights_only=True)
    args = train.parse_args(TRAIN_TINY + ["--finetune", str(ref_dir / source)])
    clf = train.build_classifier(args, train.model_config(args), 10)
    state = clf.encoder.state_dict()
    assert state.keys() == pretrained.keys()
    for k in state:
        assert torch.equal(state[k], pretrained[k]), k


def test_finetune_from_scratch_does_not_load_the_pretrained_weights(pretrained_run):
    pretrained = torch.load(pretrained_run[0] / "encoder.pt", weights_only=True)
    args = train.parse_args(TRAIN_TINY + ["--finetune", "scratch"])
    state = train.build_classifier(args, train.model_config(args), 10).encoder.state_dict()
    for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"):
        assert not torch.equal(state[k], pretrained[k]), k


def test_finetune_run_reports_test_top1(pretrained_run, tmp_path):
    out_dir = tmp_path / "ft"
    stdout = _train_in_process(TRAIN_TINY + ["--finetune", pretrained_run[0] / "checkpoint.pt", "--epochs", 1,
                                             "--output-dir", out_dir])
    assert re.search(r"test_top1 \d+\.\d\d%", stdout), stdout
    summaries = [r for r in _metrics(out_dir / "metrics.jsonl") if r.get("summary")]
    assert len(summaries) == 1 and 0 <= summaries[0]["test_top1"] <= 100
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert ck["mode"] == "finetune" and ck["epoch"] == 1


# --------------------------------------------------------------------------------------------
# 8. Benchmark
# --------------------------------------------------------------------------------------------

def test_benchmark_prints_one_json_line_with_throughput_memory_flops_and_utilization(tmp_path):
    stdout = _train_in_process(TRAIN_TINY + ["--benchmark", "--bench-steps", 2, "--bench-warmup", 1,
                                             "--output-dir", tmp_path])
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("images_per_sec", "peak_memory_mb", "gflops_per_image", "utilization"):
        assert result[key] > 0, key
    assert result["gflops_per_image"] == round(train.droppos_flops(train.model_config(
        train.parse_args(TRAIN_TINY))) / 1e9, 3)


# --------------------------------------------------------------------------------------------
# 9. Learning-rate schedule and weight-decay groups
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
    args = train.parse_args(TRAIN_TINY + ["--finetune", "scratch", "--layer-decay", "0.5"])
    clf = train.build_classifier(args, train.model_config(args), 10)
    scale = lambda n: 0.5 ** (2 + 1 - train.layer_id(n, 2))  # as train() builds it, depth 2
    groups = train.param_groups(clf, 0.05, scale)
    by_param = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(clf.named_parameters())
    assert by_param[id(named["head.weight"])] == 1.0
    assert by_param[id(named["encoder.blocks.1.attn.qkv.weight"])] == 0.5
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.25
    assert by_param[id(named["encoder.patch_embed.proj.weight"])] == 0.125


# --------------------------------------------------------------------------------------------
# 10. Analytic FLOP count of the benchmark
# --------------------------------------------------------------------------------------------

def test_droppos_flops_grow_linearly_with_depth_and_drop_without_attentive_pass():
    args = train.parse_args(TRAIN_TINY)
    cfg = train.model_config(args)
    flops = lambda **kw: train.droppos_flops(dict(cfg, **kw))
    # Each encoder block adds the same amount (training pass plus the attentive forward).
    assert flops(depth=3) - flops(depth=2) == flops(depth=2) - flops(depth=1) > 0
    assert train.droppos_flops(dict(cfg, attentive=False)) < train.droppos_flops(cfg)
    # Fewer visible patches, less work.
    assert flops(mask_ratio=0.75) < flops(mask_ratio=0.5)
