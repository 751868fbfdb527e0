"""DropPos in one file.

Wang et al., "DropPos: Pre-Training Vision Transformers by Reconstructing Dropped Positions",
NeurIPS 2023 (arXiv 2309.03576).

A ViT sees a random 25 % of an image's patches; most of them have lost their position embedding.
A small decoder, which has no position information of its own, must say for every such patch
which of the N grid cells it came from. The module reads in the paper's order:

    1. patchify / unpatchify                  patchify, unpatchify
    2. visible-patch masking                  random_masking, gather_tokens
    3. position dropping                      drop_positions, DropPos.embed_visible
    4. ViT encoder                            sincos_pos_embed, attention, Block, ViT
    5. position-free decoder, N-way head      Decoder
    6. Gaussian position smoothing            gaussian_position_targets, sigma_at
    7. attentive reconstruction weights       attentive_weights
    8. weighted soft-target loss              position_loss
    9. plain position accuracy                position_accuracy
       the whole model                        DropPos

Shapes: B batch, C channels, H×W image, p patch size, grid h×w = H/p × W/p, N = h·w patches in
raster order (patch k sits at row k // w, column k % w), n visible patches, D encoder width.
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# Encoder sizes follow ViT-Tiny/Small/Base. The decoder keeps the paper's shape (depth 2, head
# width 32) and the paper's width 512 for base; narrower encoders get a decoder as wide as
# themselves, so the decoder never costs more than the encoder it serves.
PRESETS = {
    "tiny": dict(dim=192, depth=12, heads=3, decoder_dim=192, decoder_depth=2, decoder_heads=6),
    "small": dict(dim=384, depth=12, heads=6, decoder_dim=384, decoder_depth=2, decoder_heads=12),
    "base": dict(dim=768, depth=12, heads=12, decoder_dim=512, decoder_depth=2, decoder_heads=16),
}


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def grid_size(img_size, patch_size):
    """Patch grid (h, w) of an image; ValueError when the patch size does not divide it."""
    H, W = _pair(img_size)
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if H < 1 or W < 1 or H % patch_size or W % patch_size:
        raise ValueError(f"img_size {H}x{W} must be a positive multiple of patch_size={patch_size}")
    return H // patch_size, W // patch_size


# --------------------------------------------------------------------------------------------
# 1. Patchify
# --------------------------------------------------------------------------------------------

def patchify(imgs, patch_size):
    """Step 1: cut images into patches.  imgs: (B, C, H, W) -> (B, N, p·p·C), raster order."""
    return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches, patch_size, grid):
    """Exact inverse of `patchify`.  patches: (B, N, p·p·C), grid = (h, w) -> (B, C, H, W)."""
    h, w = grid
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
                     h=h, w=w, p1=patch_size, p2=patch_size)


# --------------------------------------------------------------------------------------------
# 2. Visible-patch masking
# --------------------------------------------------------------------------------------------

def random_masking(batch, n, keep, device=None, generator=None):
    """Step 2: choose `keep` of `n` items per row, independently per row.

    Returns (batch, keep) long indices, unique within a row and in random order: the first
    `keep` entries of an argsort of uniform noise.
    """
    noise = torch.rand(batch, n, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep]


def gather_tokens(x, ids):
    """Rows of x picked per sample.  x: (B, N, D), ids: (B, n) -> (B, n, D)."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------------------------
# 3. Position dropping
# --------------------------------------------------------------------------------------------

def drop_positions(batch, n_vis, n_pos_keep, device=None):
    """Step 3: which visible tokens lose their position embedding.

    Returns (batch, n_vis) bool, True where the position is dropped; exactly
    n_vis - n_pos_keep True per row, chosen independently per sample.
    """
    keep = random_masking(batch, n_vis, n_pos_keep, device=device)
    dropped = torch.ones(batch, n_vis, dtype=torch.bool, device=device)
    return dropped.scatter(1, keep, False)


# --------------------------------------------------------------------------------------------
# 4. ViT encoder
# --------------------------------------------------------------------------------------------

def sincos_pos_embed(dim, grid):
    """Step 4: MAE's fixed 2-D sin-cos position embedding.  -> (N, dim), raster order, no [CLS].

    Patch (row r, column c) gets [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)] with
    ω_i = 10000^(-i / (dim/4)), i = 0 … dim/4 - 1: the column comes first, as in MAE.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    c = cols.reshape(-1, 1) * omega  # (N, dim/4)
    r = rows.reshape(-1, 1) * omega
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1).float()


class PatchEmbed(nn.Module):
    """Linear patch embedding, stored as timm's stride-p conv (`patch_embed.proj`).

    It is applied to patch vectors, so masked patches are never embedded: a stride-p conv over
    the image is exactly this linear map on `patchify`'s (p1 p2 c) vectors.
    """

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, patches):  # (B, n, p·p·C) -> (B, n, D)
        weight = rearrange(self.proj.weight, "d c p1 p2 -> d (p1 p2 c)")
        return F.linear(patches, weight, self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be a multiple of the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, n, D) -> (B, n, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


def attention(q, k, v):
    """softmax(q kᵀ / √d) v over each head.  q, k, v: (B, h, n, d) -> (B, h, n, d).

    A GPU runs it as SDPA's fused kernel. On a CPU two matmuls are the faster way: at these short
    sequences SDPA's backward there took 35 % of a training step, 17x its own forward."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `drop_path` (stochastic depth) is used only by fine-tuning."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x):
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Step 4: the encoder, a standard ViT whose state-dict keys are timm's VisionTransformer's.

    pos_embed: (1, 1+N, D), row 0 for [CLS] (zeros when fixed). "sincos" keeps it fixed;
    "learnable" trains it from a truncated-normal start.
    """

    def __init__(self, img_size=32, patch_size=4, in_chans=3, dim=192, depth=12, heads=3,
                 pos_embed="sincos", drop_path=0.0):
        super().__init__()
        if pos_embed not in ("sincos", "learnable"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learnable', got {pos_embed!r}")
        self.patch_size = patch_size
        self.grid = grid_size(img_size, patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim),
                                      requires_grad=pos_embed == "learnable")
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

        if pos_embed == "sincos":
            self.pos_embed.data[0, 1:] = sincos_pos_embed(dim, self.grid)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(dim, -1))
        self.apply(_init_linear_and_norm)

    def encode(self, x, final_norm=True):
        """Prepend [CLS] to position-embedded tokens and run the blocks, then the final norm unless
        final_norm is False.  (B, n, D) -> (B, 1+n, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) if final_norm else x

    def forward_features(self, imgs, final_norm=True):
        """All patches with all true positions.  imgs: (B, C, H, W) -> (B, 1+N, D) after the norm;
        with final_norm=False, the last block's output (MAE's fine-tuning head pools that)."""
        x = self.patch_embed(patchify(imgs, self.patch_size))
        return self.encode(x + self.pos_embed[:, 1:], final_norm)


def _init_linear_and_norm(m):
    # MAE's initialisation: xavier-uniform weights, zero biases, unit LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# 5. Decoder
# --------------------------------------------------------------------------------------------

class Decoder(nn.Module):
    """Step 5: a few blocks over [CLS] + visible tokens, then an N-way position classifier.

    It has no position embedding and no mask tokens, so the only position information it can
    use is what the encoder put into the tokens.
    """

    def __init__(self, dim, decoder_dim, depth, heads, num_patches):
        super().__init__()
        self.embed = nn.Linear(dim, decoder_dim)
        self.blocks = nn.ModuleList(Block(decoder_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, num_patches)
        self.apply(_init_linear_and_norm)

    def forward(self, latent):  # (B, 1+n, D) -> logits (B, n, N)
        x = self.embed(latent)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 1:]))


# --------------------------------------------------------------------------------------------
# 6. Position smoothing
# --------------------------------------------------------------------------------------------

def gaussian_position_targets(grid, sigma, device=None):
    """Step 6: soft targets over positions.  -> (N, N), row i = target for true position i.

    t_ij ∝ exp(-‖g_i - g_j‖² / σ²) over (row, col) grid coordinates; σ = 0 is one-hot.
    Each row is normalised to sum to 1 (the official code divides by column sums, which leaves
    rows at the image border summing to less or more than 1).
    """
    h, w = grid
    n = h * w
    if sigma == 0:
        return torch.eye(n, device=device)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
    g = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float()  # (N, 2)
    d2 = (g[:, None, :] - g[None, :, :]).pow(2).sum(-1)  # (N, N)
    kernel = torch.exp(-d2 / sigma ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def sigma_at(sigma0, progress, decay=True):
    """Step 6's schedule: σ falls linearly from σ0 to 0 as training progress goes 0 → 1."""
    return sigma0 * (1.0 - min(max(progress, 0.0), 1.0)) if decay else sigma0


# --------------------------------------------------------------------------------------------
# 7. Attentive reconstruction
# --------------------------------------------------------------------------------------------

def attentive_weights(encoder, imgs, ids_keep, tau):
    """Step 7: how much each visible patch matters to its image.  -> (B, n), rows sum to 1.

    The current encoder looks at the whole image with every true position; a patch's weight is
    the softmax (temperature τ, over all N patches) of its cosine similarity to [CLS], kept for
    the visible patches and renormalised. No gradient flows through it.
    """
    # On a CPU this pass is memory-bound at large batches; chunks of ~4k tokens keep a layer's
    # activations in cache (batch 512 ran 1.4× faster). A GPU takes the batch whole.
    chunk = max(1, 4096 // (encoder.num_patches + 1)) if imgs.device.type == "cpu" else len(imgs)
    with torch.no_grad():
        feats = torch.cat([encoder.forward_features(c) for c in imgs.split(chunk)]).float()  # (B, 1+N, D)
        sim = F.cosine_similarity(feats[:, :1], feats[:, 1:], dim=-1)  # (B, N)
        # The softmax over the visible patches alone is the same number as the renormalised one,
        # which is 0 / 0 once every visible weight underflows (τ = 0.003 did). Less the maximum
        # and in float64, even a τ near 0 gives the one-hot weights it tends to.
        sim = sim.gather(1, ids_keep).double()  # (B, n)
        return torch.softmax((sim - sim.amax(1, keepdim=True)) / tau, dim=-1).float()


# --------------------------------------------------------------------------------------------
# 8. Loss and 9. metric
# --------------------------------------------------------------------------------------------

def position_loss(logits, targets, dropped, weights=None):
    """Step 8: soft-target cross-entropy over dropped positions, L = Σ w·CE / Σ w.

    logits, targets: (B, n, N); dropped: (B, n) bool; weights: (B, n) or None for uniform.
    """
    ce = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B, n)
    w = dropped.float() if weights is None else weights * dropped
    return (w * ce).sum() / w.sum()


def position_accuracy(logits, ids_keep, dropped):
    """Step 9: top-1 position accuracy over dropped patches, unweighted (the official code weights
    it by step 7).  Returns a 0-dim tensor: the forward itself forces no device-to-host copy."""
    hit = (logits.argmax(-1) == ids_keep) & dropped
    return hit.sum() / dropped.sum()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class DropPosOutput(NamedTuple):
    loss: torch.Tensor      # ()
    acc: torch.Tensor       # ()
    logits: torch.Tensor    # (B, n, N)
    ids_keep: torch.Tensor  # (B, n) true positions of the visible tokens, in encoding order
    dropped: torch.Tensor   # (B, n) bool, True where the position embedding was dropped


class DropPos(nn.Module):
    """DropPos pre-training: encoder (`.encoder`, a ViT), [MASK] position token, decoder.

    mask_ratio γ: share of patches hidden; pos_mask_ratio γ_pos: share of visible patches whose
    position embedding is replaced by [MASK]; tau: temperature of attentive reconstruction.
    """

    def __init__(self, img_size=32, patch_size=4, in_chans=3, dim=192, depth=12, heads=3,
                 decoder_dim=192, decoder_depth=2, decoder_heads=6, mask_ratio=0.75,
                 pos_mask_ratio=0.75, pos_embed="sincos", attentive=True, tau=0.1):
        super().__init__()
        self.encoder = ViT(img_size, patch_size, in_chans, dim, depth, heads, pos_embed)
        self.grid = self.encoder.grid
        N = self.encoder.num_patches
        if not 0 <= mask_ratio < 1 or int(N * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio must be in [0, 1) and leave at least one of the {N} "
                             f"patches visible (at most {1 - 1 / N:.4g}), got {mask_ratio}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.n_vis = int(N * (1 - mask_ratio))
        if not 0 < pos_mask_ratio <= 1 or int(self.n_vis * (1 - pos_mask_ratio)) >= self.n_vis:
            raise ValueError(f"pos_mask_ratio must be in (0, 1] and drop at least one of the "
                             f"{self.n_vis} visible positions, got {pos_mask_ratio}")
        self.n_pos_keep = int(self.n_vis * (1 - pos_mask_ratio))
        self.attentive = attentive
        self.tau = tau
        self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_pos_token, std=0.02)
        self.decoder = Decoder(dim, decoder_dim, decoder_depth, decoder_heads, N)

    def embed_visible(self, imgs):
        """Steps 1-3: patchify, keep n visible patches, drop most of their positions.

        Returns tokens (B, n, D), ids_keep (B, n), dropped (B, n) bool. The [MASK] token is
        broadcast per image (memory linear in B; the official code builds a B×B-sized one).
        """
        B = imgs.shape[0]
        enc = self.encoder
        ids_keep = random_masking(B, enc.num_patches, self.n_vis, device=imgs.device)
        x = enc.patch_embed(gather_tokens(patchify(imgs, enc.patch_size), ids_keep))
        dropped = drop_positions(B, self.n_vis, self.n_pos_keep, device=imgs.device)
        pos = enc.pos_embed[0, 1:][ids_keep]  # (B, n, D) true positions
        pos = torch.where(dropped.unsqueeze(-1), self.mask_pos_token, pos)
        return x + pos, ids_keep, dropped

    def forward(self, imgs, sigma):
        """One DropPos step on imgs (B, C, H, W) with smoothing σ (a float).  -> DropPosOutput."""
        tokens, ids_keep, dropped = self.embed_visible(imgs)
        logits = self.decoder(self.encoder.encode(tokens))  # (B, n, N)
        targets = gaussian_position_targets(self.grid, sigma, imgs.device)[ids_keep]  # (B, n, N)
        weights = attentive_weights(self.encoder, imgs, ids_keep, self.tau) if self.attentive else None
        loss = position_loss(logits, targets, dropped, weights)
        acc = position_accuracy(logits, ids_keep, dropped)
        return DropPosOutput(loss, acc, logits, ids_keep, dropped)
