"""Pre-train DropPos, watch it learn, evaluate what it learned, and time it.

    python train.py --dataset cifar10                       # pre-train ViT-Tiny/4 on CIFAR-10
    python train.py --dataset synthetic --epochs 2          # offline, no download
    python train.py --finetune runs/cifar10-pretrain/checkpoint.pt   # fine-tune on it
    python train.py --finetune scratch                      # ... or from random weights
    python train.py --benchmark                             # images/s, memory, utilisation
    torchrun --nproc_per_node=2 train.py --dataset cifar10  # several processes / GPUs

Every flag is listed by `python train.py --help`, grouped by purpose.
"""

import argparse
import json
import math
import os
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision.transforms import v2
from torchvision.utils import make_grid, save_image

import droppos
from droppos import PRESETS, DropPos, ViT, patchify, sigma_at, unpatchify

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "synthetic": 32, "imagefolder": 224}
NATIVE_PATCH = {32: 4, 224: 16}


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, never a traceback."""


# ============================================================================================
# Command line
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help="cifar10 | cifar100 | imagefolder | synthetic")
    g.add_argument("--data-dir", default="data", help="where datasets live (CIFAR downloads here); "
                   "for imagefolder, the ImageFolder tree of training images")
    g.add_argument("--val-dir", default=None, help="imagefolder: held-out tree for k-NN and fine-tune "
                   "evaluation (default: every 10th image of --data-dir is held out)")
    g.add_argument("--classes", type=int, default=None, help="imagefolder: keep the first K classes")
    g.add_argument("--per-class", type=int, default=None, help="imagefolder: at most M images per class")
    g.add_argument("--synthetic-size", type=int, default=2048, help="synthetic: number of images")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes for photos; default 0 on "
                   "a CPU (a loader process competing for the cores slows the training step many times over), "
                   "8 on a GPU. CIFAR-size sets are held in memory and augmented a batch at a time: no workers")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="encoder/decoder preset")
    g.add_argument("--img-size", type=int, default=None, help="default: 32 for CIFAR/synthetic, 224 for imagefolder")
    g.add_argument("--patch-size", type=int, default=None, help="default: 4 at 32 px, 16 at 224 px")
    for name in ("dim", "depth", "heads", "decoder-dim", "decoder-depth", "decoder-heads"):
        g.add_argument(f"--{name}", type=int, default=None, help="override the preset")

    g = p.add_argument_group("method (paper section 3; each ablation is one flag)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="γ: share of patches hidden")
    g.add_argument("--pos-mask-ratio", type=float, default=0.75, help="γ_pos: share of visible patches whose position is dropped")
    g.add_argument("--sigma", type=float, default=1.0, help="σ0 of position smoothing (0 = one-hot targets)")
    g.add_argument("--no-sigma-decay", action="store_true", help="keep σ = σ0 instead of decaying it to 0")
    g.add_argument("--no-attentive", action="store_true", help="uniform instead of attentive loss weights")
    g.add_argument("--tau", type=float, default=0.1, help="temperature of attentive reconstruction")
    g.add_argument("--pos-embed", default="sincos", choices=["sincos", "learnable"])

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--blr", type=float, default=None, help="base lr; lr = blr × total batch / 256. "
                   "Default 2e-3 for pre-training (lr 5e-4 at batch 64: fastest learning we measured "
                   "on a CPU budget; the paper uses 1.5e-4 at batch 512), 1e-3 for fine-tuning")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=5.0, help="0 = no clipping")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("fine-tuning (--finetune CHECKPOINT | scratch)")
    g.add_argument("--finetune", default=None, help="checkpoint.pt or encoder.pt of a pre-training run, or 'scratch'")
    g.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay")
    g.add_argument("--drop-path", type=float, default=0.1)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 = off)")

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--output-dir", default=None, help="default: runs/<dataset>-<pretrain|finetune>")
    g.add_argument("--knn-every", type=int, default=10, help="k-NN monitor every N epochs and at the end (0 = off)")
    g.add_argument("--knn-k", type=int, default=20)
    g.add_argument("--knn-t", type=float, default=0.07)
    g.add_argument("--log-every", type=float, default=5.0, help="seconds between progress lines (0 = every step)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <output-dir>/checkpoint.pt)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, and on a CPU where bf16 matmuls beat fp32 ones")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true", help="time training steps, print one JSON line")
    g.add_argument("--bench-steps", type=int, default=10)
    g.add_argument("--bench-warmup", type=int, default=3)
    return finish_args(p.parse_args(argv))


def finish_args(args):
    """Fill size defaults that depend on the dataset, and reject impossible values early."""
    if args.dataset not in NATIVE_SIZE:
        raise UserError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(NATIVE_SIZE)}")
    args.img_size = args.img_size or NATIVE_SIZE[args.dataset]
    args.patch_size = args.patch_size or NATIVE_PATCH.get(args.img_size, 16)
    if args.blr is None:
        args.blr = 1e-3 if args.finetune else 2e-3
    for name in ("batch_size", "epochs", "synthetic_size", "bench_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers is None:
        args.workers = 8 if torch.cuda.is_available() and args.device != "cpu" else 0
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.output_dir is None:
        args.output_dir = f"runs/{args.dataset}-{'finetune' if args.finetune else 'pretrain'}"
    return args


def model_config(args):
    """DropPos constructor arguments: the preset, then any size overrides."""
    cfg = dict(PRESETS[args.model])
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return dict(cfg, img_size=args.img_size, patch_size=args.patch_size, mask_ratio=args.mask_ratio,
                pos_mask_ratio=args.pos_mask_ratio, pos_embed=args.pos_embed,
                attentive=not args.no_attentive, tau=args.tau)


def build_droppos(cfg):
    try:
        return DropPos(**cfg)
    except ValueError as e:
        raise UserError(str(e)) from None


# ============================================================================================
# Devices, precision, processes
# ============================================================================================

def setup_distributed():
    """(rank, world size, local rank); starts the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return dist.get_rank(), world, local


def pick_device(name, local_rank):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def matmul_flops(device, dtype, max_n=None, budget_s=0.3):
    """Measured FLOP/s of large square matmuls: the peak a training step can hope for."""
    max_n = max_n or (8192 if device.type == "cuda" else 2048)
    n, per_call = 256, 0.0
    while True:  # grow the size until one product takes long enough to time, or is large
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        per_call = _time(lambda: a @ b, device, reps=1)
        if per_call > 0.02 or n >= max_n:
            break
        n *= 2
    reps = max(1, int(budget_s / max(per_call, 1e-6)))
    return 2 * n ** 3 / _time(lambda: a @ b, device, reps)


def _time(fn, device, reps):
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_precision(name, device):
    """bf16 autocast where it pays: every recent GPU, and CPUs with bf16 matmul units
    (avx512_bf16/AMX). On a CPU without them, bf16 matmuls run ~100× slower than fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fast = matmul_flops(device, torch.bfloat16, max_n=512, budget_s=0.05) > \
        matmul_flops(device, torch.float32, max_n=512, budget_s=0.05)
    return "bf16" if fast else "fp32"


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ============================================================================================
# Data
# ============================================================================================

def mix_seed(*parts):
    """One 63-bit seed from several integers, different for different tuples in practice."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p) % 2 ** 63
    return h


class SyntheticImages(Dataset):
    """Offline images with spatial structure: a sky-to-ground luminance ramp, a left-to-right
    colour ramp and class-dependent stripes, each image jittered by its own seed. Where a patch
    sits is visible in its colour and brightness, so positions are learnable; the stripes'
    frequency and orientation give 10 classes for k-NN and fine-tuning."""

    num_classes = 10

    def __init__(self, n, size, seed=0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(mix_seed(self.seed, i))
        label = i % self.num_classes
        s = self.size
        y = torch.linspace(0, 1, s).view(s, 1).expand(s, s)
        x = torch.linspace(0, 1, s).view(1, s).expand(s, s)
        tint = torch.rand(3, 1, 1, generator=g) * 0.3
        img = torch.stack([0.3 + 0.5 * x, 0.8 - 0.6 * y, 0.9 - 0.5 * y]) * 0.7 + tint
        freq = (label % 5 + 1) * math.pi * 2
        phase = torch.rand(1, generator=g).item() * 2 * math.pi
        stripes = torch.sin(freq * (y if label < 5 else x) + phase)
        img = img + 0.2 * stripes + 0.05 * torch.randn(3, s, s, generator=g)
        return v2.functional.to_pil_image(img.clamp(0, 1)), label


class SeededTransform(Dataset):
    """Applies random augmentation seeded by (seed, epoch, index): an image's crop does not depend
    on the number of workers or on where in the epoch a resumed run starts, which is what lets
    --resume reproduce an uninterrupted run exactly."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, i))
            return self.transform(img), label


def crop_scale(finetune):
    # Paper: RandomResizedCrop(scale 0.2-1) + flip for pre-training; MAE fine-tuning crops from 0.08.
    return (0.08 if finetune else 0.2, 1.0)


def train_transform(size, finetune=False):
    return v2.Compose([v2.ToImage(),
                       v2.RandomResizedCrop(size, scale=crop_scale(finetune),
                                            interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(MEAN, STD)])


def eval_transform(size):
    return v2.Compose([v2.ToImage(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def load_datasets(args):
    """(train, held_out, num_classes), untransformed; held_out is None where there is none."""
    if args.dataset == "synthetic":
        return (SyntheticImages(args.synthetic_size, args.img_size, args.seed),
                SyntheticImages(max(args.synthetic_size // 5, 10), args.img_size, args.seed + 1), 10)
    if args.dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
        name = "cifar-10-python.tar.gz" if args.dataset == "cifar10" else "cifar-100-python.tar.gz"
        try:
            train = cls(args.data_dir, train=True, download=True)
            test = cls(args.data_dir, train=False, download=True)
        except Exception as e:  # network, disk or archive: all end the same way for the user
            why = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"could not get {args.dataset} into {args.data_dir!r} ({type(e).__name__}: {why}). "
                            f"Download {name} from https://www.cs.toronto.edu/~kriz/cifar.html and put it in "
                            f"{args.data_dir!r} (or pass --data-dir), or use --dataset synthetic, which works "
                            f"offline") from None
        return train, test, len(train.classes)
    return load_imagefolder(args)


def load_imagefolder(args):
    root = Path(args.data_dir)
    if not root.is_dir():
        raise UserError(f"data folder {str(root)!r} does not exist (--data-dir)")
    try:
        full = torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"data folder {str(root)!r} holds no images in class sub-folders ({e})") from None
    classes = full.classes[: args.classes] if args.classes else full.classes
    keep, seen = [], {}
    for i, (_, c) in enumerate(full.samples):
        if c < len(classes) and seen.get(c, 0) < (args.per_class or float("inf")):
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    if args.val_dir:
        val_root = Path(args.val_dir)
        if not val_root.is_dir():
            raise UserError(f"validation folder {str(val_root)!r} does not exist (--val-dir)")
        val = torchvision.datasets.ImageFolder(str(val_root))
        if val.classes[: len(classes)] != classes:
            raise UserError(f"--val-dir classes {val.classes[:5]}... differ from --data-dir classes {classes[:5]}...")
        val = Subset(val, [i for i, (_, c) in enumerate(val.samples) if c < len(classes)])
        return Subset(full, keep), val, len(classes)
    # Deterministic hold-out: every 10th kept image.
    return Subset(full, [i for j, i in enumerate(keep) if j % 10]), \
        Subset(full, [i for j, i in enumerate(keep) if j % 10 == 0]), len(classes)


class SkipSampler(torch.utils.data.Sampler):
    """A distributed, seeded shuffle per epoch that can start part-way through (mid-epoch resume)."""

    def __init__(self, dataset, rank, world, seed):
        self.inner = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self):
        return len(self.inner) - self.skip


def decode_in_memory(dataset, size, limit_bytes=2 ** 31):
    """A CIFAR-size training set as one uint8 tensor (M, 3, size, size) and its labels (M,).

    None when the images are larger than 64 px, not already size×size, or would fill more than
    2 GiB: such photos are cropped one by one from their full resolution instead.
    """
    if size > 64 or len(dataset) * 3 * size * size > limit_bytes:
        return None
    if isinstance(dataset, torchvision.datasets.CIFAR10):  # CIFAR-100 too: it subclasses CIFAR-10
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)
    images = torch.empty(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in range(len(dataset)):
        img, labels[i] = dataset[i]
        if img.size != (size, size):
            return None
        images[i] = v2.functional.pil_to_tensor(img)
    return images, labels


def random_crop_boxes(n, height, width, scale, generator, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop's boxes for n images at once.  -> (n, 4) float: top, left, height, width.

    As torchvision draws them: area share uniform in `scale`, aspect ratio log-uniform in `ratio`,
    the first of `tries` draws that fits inside the image, else the whole image (torchvision's
    fallback for a square image), and a uniformly placed top-left corner.
    """
    area = torch.empty(n, tries).uniform_(*scale, generator=generator) * height * width
    aspect = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first draw that fits
    any_fit = fits.any(1)
    h = torch.where(any_fit, h.gather(1, first)[:, 0], float(height))
    w = torch.where(any_fit, w.gather(1, first)[:, 0], float(width))
    top = (torch.rand(n, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).floor()
    return torch.stack([top, left, h, w], dim=1)


def resample_crops(imgs, boxes, flip, size):
    """Every image's box resized to size×size (bicubic) in one grid_sample call, mirrored where
    flip.  imgs: (B, C, H, W) float; boxes: (B, 4) as `random_crop_boxes`; flip: (B,) bool."""
    B, C, H, W = imgs.shape
    top, left, h, w = boxes.unbind(1)
    # affine_grid maps output coordinates in [-1, 1] (pixel edges, align_corners=False) to input
    # coordinates: the output's edges land on the box's edges.
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta.to(imgs.device), [B, C, size, size], align_corners=False)
    return F.grid_sample(imgs, grid, mode="bicubic", padding_mode="border", align_corners=False)


def _mean_std(device):
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(imgs):
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised, as the per-image transforms do."""
    mean, std = _mean_std(imgs.device)
    return (imgs - mean) / std


def denormalize(imgs):
    """Inverse of `normalize`, clamped to [0, 1] for display."""
    mean, std = _mean_std(imgs.device)
    return (imgs * std + mean).clamp(0, 1)


def augment_batch(imgs, size, scale, generator):
    """`train_transform` for a whole uint8 batch (B, 3, S, S) on its device: RandomResizedCrop,
    horizontal flip, normalisation.  -> (B, 3, size, size) float."""
    B, _, H, W = imgs.shape
    boxes = random_crop_boxes(B, H, W, scale, generator)
    flip = torch.rand(B, generator=generator) < 0.5
    # Bicubic overshoots; clamping matches what resampling 8-bit images gives.
    return normalize(resample_crops(imgs.float() / 255, boxes, flip, size).clamp(0, 1))


class TrainStream:
    """This process's training batches for an epoch: augmented, normalised, on the device.

    CIFAR-size sets are decoded once into memory and each batch is augmented in one resampling
    call on the device (~1 ms of PIL work per image saved); photos are cropped one by one from
    their full resolution by `SeededTransform`. Both seed the augmentation by (seed, epoch, batch
    or image), so a resumed run sees exactly the crops of an uninterrupted one.
    """

    def __init__(self, train_set, args, rank, world, finetune, device):
        self.size, self.seed, self.rank, self.device = args.img_size, args.seed, rank, device
        self.scale = crop_scale(finetune)
        stored = decode_in_memory(train_set, args.img_size)
        self.in_memory = stored is not None
        if self.in_memory:
            self.data = TensorDataset(*stored)
        else:
            self.data = SeededTransform(train_set, train_transform(args.img_size, finetune), args.seed)
        # Indexing a tensor needs no loader processes: they would only compete for the cores. The
        # generator keeps the loader from drawing its seed from the global RNG (exact resume).
        self.loader = DataLoader(self.data, args.batch_size, sampler=SkipSampler(self.data, rank, world, args.seed),
                                 num_workers=0 if self.in_memory else args.workers, drop_last=True,
                                 generator=torch.Generator().manual_seed(args.seed))
        self.steps = len(self.loader)  # per epoch

    def epoch(self, epoch, start_step=0):
        """Yields (images, labels) on the device for the steps of `epoch` from start_step on."""
        self.loader.sampler.set_epoch(epoch, skip=start_step * self.loader.batch_size)
        if not self.in_memory:
            self.data.epoch = epoch
        for step, (imgs, labels) in enumerate(self.loader, start_step):
            imgs = imgs.to(self.device, non_blocking=True)
            if self.in_memory:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, self.rank))
                imgs = augment_batch(imgs, self.size, self.scale, g)
            yield imgs, labels.to(self.device, non_blocking=True)


# ============================================================================================
# Optimisation
# ============================================================================================

def param_groups(model, weight_decay, lr_scale=None):
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (paper),
    and, for fine-tuning, an lr scale per parameter (layer-wise decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("token", "pos_embed"))
        scale = lr_scale(name) if lr_scale else 1.0
        key = (no_decay, scale)
        groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def make_optimizer(groups, lr, betas, device):
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def optimizer_step(model, optimizer, loss, clip_grad):
    """Backward, clip the gradient norm (0 = no clipping), update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()


def lr_at(step, total, warmup, base_lr, min_lr):
    """Linear warm-up, then half-cosine to min_lr, per optimiser step."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def layer_id(name, depth):
    """Depth of a fine-tuning parameter for layer-wise lr decay: embeddings 0, block i → i+1."""
    if name.startswith("encoder.") and name.split(".")[1] in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


# ============================================================================================
# Checkpoints
# ============================================================================================

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, foreign objects: all unusable alike
        raise UserError(f"checkpoint {str(path)!r} is corrupt, truncated or not a checkpoint "
                        f"({type(e).__name__})") from None


def load_state(module, state, what):
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # TypeError: not a dict at all
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise UserError(f"{what} does not match this model: {detail} "
                        f"(check --model, --img-size, --patch-size and the width/depth flags)") from None


def rng_state():
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ============================================================================================
# Evaluation: k-NN monitor, classification accuracy, reassembly picture
# ============================================================================================

@torch.no_grad()
def extract_features(encoder, loader, device, precision):
    """Global average of the encoder's patch tokens for every image.  -> (M, D), (M,)."""
    feats, labels = [], []
    for imgs, y in loader:
        with autocast(device, precision):
            f = encoder.forward_features(imgs.to(device, non_blocking=True))[:, 1:].mean(1)
        feats.append(F.normalize(f.float(), dim=-1))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_classify(train_feats, train_labels, test_feats, num_classes, k=20, t=0.07, chunk=512):
    """Weighted k-NN vote (DINO): each of the k most cosine-similar training features votes for
    its label with weight exp(sim / t).  Features must be L2-normalised.  -> (M_test,) labels."""
    preds = []
    for q in test_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(min(k, train_feats.shape[0]), dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def run_knn(encoder, train_set, val_set, num_classes, args, device, precision):
    """k-NN top-1 (%) of the encoder's features, on held-out images, without augmentation."""
    was_training = encoder.training
    encoder.eval()
    tf = eval_transform(args.img_size)
    mk = lambda ds: DataLoader(SeededTransform(ds, tf, 0), 256, num_workers=args.workers)
    tr_f, tr_y = extract_features(encoder, mk(train_set), device, precision)
    te_f, te_y = extract_features(encoder, mk(val_set), device, precision)
    encoder.train(was_training)
    pred = knn_classify(tr_f, tr_y, te_f, num_classes, args.knn_k, args.knn_t)
    return 100.0 * (pred == te_y).float().mean().item()


@torch.no_grad()
def save_reassembly(model, imgs, path, device, precision):
    """Rows: originals, the visible patches in place, and each visible patch moved to the position
    the model predicts for it (positions nobody claims stay grey)."""
    was_training = model.training
    model.eval()
    imgs = imgs.to(device)
    with autocast(device, precision):
        out = model(imgs, 0.0)
    model.train(was_training)
    p, grid = model.encoder.patch_size, model.grid
    pixels = patchify(denormalize(imgs), p)  # (B, N, p·p·3)
    vis_patches = droppos.gather_tokens(pixels, out.ids_keep)  # (B, n, p·p·3)
    grey = torch.full_like(pixels, 0.5)
    visible = grey.scatter(1, out.ids_keep[..., None].expand_as(vis_patches), vis_patches)
    pred = out.logits.float().argmax(-1)  # (B, n)
    moved = grey.scatter(1, pred[..., None].expand_as(vis_patches), vis_patches)
    rows = [pixels, visible, moved]
    grid_img = make_grid(torch.cat([unpatchify(r, p, grid) for r in rows]).cpu(), nrow=imgs.shape[0], padding=1)
    save_image(grid_img, path)


# ============================================================================================
# The training loop (pre-training and fine-tuning share it)
# ============================================================================================

class Logger:
    """Progress lines on stdout and one JSON object per line in metrics.jsonl (rank 0 only)."""

    def __init__(self, out_dir, enabled, resume):
        self.enabled = enabled
        self.file = open(out_dir / "metrics.jsonl", "a" if resume else "w") if enabled else None

    def __call__(self, record, line=None):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if line:
            print(line, flush=True)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(args):
    rank, world, local = setup_distributed()
    device = pick_device(args.device, local)
    precision = pick_precision(args.precision, device)
    torch.manual_seed(args.seed + rank)  # masking differs per process, data order is shared
    random.seed(args.seed + rank)
    out_dir = Path(args.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    finetune = args.finetune is not None

    train_set, val_set, num_classes = load_datasets(args)
    if len(train_set) < args.batch_size * world:
        raise UserError(f"the training set has {len(train_set)} images, fewer than one batch "
                        f"({args.batch_size} × {world} processes); lower --batch-size")
    stream = TrainStream(train_set, args, rank, world, finetune, device)
    steps_per_epoch = stream.steps
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    base_lr = args.blr * args.batch_size * world / 256

    cfg = model_config(args)
    if finetune:
        model = build_classifier(args, cfg, num_classes).to(device)
        depth = len(model.encoder.blocks)
        groups = param_groups(model, args.weight_decay,
                              lambda n: args.layer_decay ** (depth + 1 - layer_id(n, depth)))
        betas = (0.9, 0.999)
    else:
        model = build_droppos(cfg).to(device)
        groups = param_groups(model, args.weight_decay)
        betas = (0.9, 0.95)
    optimizer = make_optimizer(groups, base_lr, betas, device)
    mix = batch_mixer(args, num_classes) if finetune else None

    start_epoch, start_step, best = 0, 0, 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        ck = load_checkpoint(path)
        if not isinstance(ck, dict) or "model" not in ck or "optimizer" not in ck:
            raise UserError(f"checkpoint {str(path)!r} is not a training checkpoint of this script")
        if ck.get("mode") != ("finetune" if finetune else "pretrain"):
            raise UserError(f"checkpoint {str(path)!r} is from {ck.get('mode')}, not "
                            f"{'fine-tuning' if finetune else 'pre-training'}")
        load_state(model, ck["model"], f"checkpoint {str(path)!r}")
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {str(path)!r}: optimiser state does not match ({e})") from None
        start_epoch, start_step, best = ck["epoch"], ck["step_in_epoch"], ck.get("best", 0.0)
        set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        if rank == 0:
            print(f"resumed from {path} at epoch {start_epoch} step {start_step}", flush=True)

    net = model
    if args.compile:
        net = torch.compile(net)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[local] if device.type == "cuda" else None)

    log = Logger(out_dir, rank == 0, args.resume)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{'fine-tuning' if finetune else 'pre-training'} on {args.dataset}: {len(train_set)} images, "
              f"{world} process(es) on {device}, {precision}, {n_params / 1e6:.2f}M parameters, "
              f"lr {base_lr:.2e}, {steps_per_epoch} steps/epoch", flush=True)

    vis_imgs = None
    if not finetune and rank == 0 and val_set is not None:
        vis_imgs = torch.stack([eval_transform(args.img_size)(val_set[i][0]) for i in range(min(8, len(val_set)))])

    def gather_states():
        if world == 1:
            return [rng_state()]
        states = [None] * world
        dist.all_gather_object(states, rng_state())
        return states

    def checkpoint(epoch, step_in_epoch):
        states = gather_states()  # every rank takes part in the collective
        if rank == 0:
            save_checkpoint(ckpt_path, {"mode": "finetune" if finetune else "pretrain", "model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "epoch": epoch,
                                        "step_in_epoch": step_in_epoch, "best": best, "rng": states,
                                        "args": dict(vars(args))})
            if not finetune:
                torch.save(model.encoder.state_dict(), out_dir / "encoder.pt")

    # Ctrl-C and SIGTERM only raise a flag, so the checkpoint is taken between two steps, never
    # half-way through an optimiser update; a second Ctrl-C quits at once, without saving.
    interrupted = []

    def on_signal(*_):
        if interrupted:
            print("\ninterrupted twice: quit without saving", file=sys.stderr, flush=True)
            raise SystemExit(130)
        interrupted.append(True)

    old_handlers = [signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)]
    t_start, epoch, step_in_epoch = time.time(), start_epoch, start_step
    first_step = start_epoch * steps_per_epoch + start_step  # for the time-left estimate
    try:
        for epoch in range(start_epoch, args.epochs):
            step_in_epoch = start_step  # non-zero only in the epoch a mid-epoch resume starts in
            net.train()
            sums = torch.zeros(3, device=device)  # loss, accuracy, steps since the last line
            ep_sums = torch.zeros(3, device=device)
            t_last, imgs_since = time.time(), 0
            for imgs, labels in stream.epoch(epoch, start_step):
                if stop_requested(interrupted, step_in_epoch, world, device):
                    raise KeyboardInterrupt
                step = epoch * steps_per_epoch + step_in_epoch
                lr = lr_at(step, total_steps, warmup_steps, base_lr, args.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                progress = step / total_steps
                sigma = sigma_at(args.sigma, progress, decay=not args.no_sigma_decay)
                with autocast(device, precision):
                    if finetune:
                        loss, acc = classification_step(net, imgs, labels, mix, args.smoothing, num_classes)
                    else:
                        out = net(imgs, sigma)
                        loss, acc = out.loss, out.acc
                optimizer_step(model, optimizer, loss, args.clip_grad)
                stat = torch.stack([loss.detach().float(), acc.detach().float(), torch.ones((), device=device)])
                sums += stat
                ep_sums += stat
                step_in_epoch += 1
                imgs_since += imgs.shape[0] * world

                now = time.time()
                if now - t_last >= args.log_every or step_in_epoch == steps_per_epoch:
                    s = reduce_mean(sums, 1)  # this process's shard: no collective off the step grid
                    if not math.isfinite(s[0]):
                        raise FloatingPointError(f"epoch {epoch} step {step_in_epoch}")
                    ips = imgs_since / (now - t_last)
                    done = step + 1 - first_step
                    left = (total_steps - step - 1) * (now - t_start) / max(done, 1)
                    rec = {"epoch": epoch, "step": step + 1, "loss": s[0], "acc": s[1], "lr": lr,
                           "sigma": sigma, "images_per_sec": ips}
                    log(rec, f"epoch {epoch + 1}/{args.epochs}  step {step_in_epoch}/{steps_per_epoch}  "
                             f"loss {s[0]:.4f}  {'top-1' if finetune else 'pos-acc'} {100 * s[1]:.2f}%  "
                             f"lr {lr:.2e}  {'' if finetune else f'σ {sigma:.3f}  '}{ips:.0f} img/s  "
                             f"left {fmt_time(left)}")
                    sums.zero_()
                    t_last, imgs_since = now, 0

            # ---- end of epoch: evaluate, summarise, checkpoint
            s = reduce_mean(ep_sums, world)
            rec = {"epoch": epoch, "summary": True, "loss": s[0], "acc": s[1],
                   "elapsed_s": time.time() - t_start}
            last = epoch + 1 == args.epochs
            if finetune:
                top1 = evaluate_classifier(model, val_set, args, device, precision, rank, world)
                best = max(best, top1)
                rec.update(test_top1=top1, best_top1=best)
            elif val_set is not None and args.knn_every and ((epoch + 1) % args.knn_every == 0 or last):
                if rank == 0:
                    rec["knn_top1"] = run_knn(model.encoder, train_set, val_set, num_classes, args, device, precision)
            if rank == 0 and vis_imgs is not None:
                save_reassembly(model, vis_imgs, out_dir / "reassembly.png", device, precision)
            start_step = 0
            checkpoint(epoch + 1, 0)
            extra = "".join(f"  {k} {v:.2f}%" for k, v in rec.items() if k.endswith("top1"))
            log(rec, f"== epoch {epoch + 1}/{args.epochs} done  loss {s[0]:.4f}  "
                     f"{'train top-1' if finetune else 'pos-acc'} {100 * s[1]:.2f}%{extra}  "
                     f"elapsed {fmt_time(rec['elapsed_s'])}")
    except KeyboardInterrupt:
        checkpoint(epoch, step_in_epoch)
        if rank == 0:
            print(f"\ninterrupted: saved {ckpt_path} at epoch {epoch} step {step_in_epoch}; "
                  f"continue with --resume", file=sys.stderr, flush=True)
        raise SystemExit(130)
    except FloatingPointError as e:
        kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
        raise UserError(f"loss became non-finite at {e}; stopped without saving ({kept}). "
                        f"Lower --blr, or try --precision fp32") from None
    finally:
        for s, h in zip((signal.SIGINT, signal.SIGTERM), old_handlers):
            signal.signal(s, h)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return model


def stop_requested(flag, step, world, device, every=20):
    """Whether to stop for a signal. Under torchrun the processes agree every `every` steps, so
    all of them take the checkpoint at the same step."""
    if world == 1:
        return bool(flag)
    if step % every:
        return False
    t = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def reduce_mean(sums, world):
    """Mean of the logged quantities over steps and processes, as Python floats."""
    if world > 1:
        sums = sums.clone()
        dist.all_reduce(sums)
    s = sums.tolist()
    n = max(s[-1], 1)
    return [v / n for v in s[:-1]]


# ============================================================================================
# Fine-tuning
# ============================================================================================

class Classifier(nn.Module):
    """The pre-trained ViT with MAE's fine-tuning head: average of patch tokens, LayerNorm, linear."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head keeps early steps stable
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):  # (B, C, H, W) -> (B, classes)
        return self.head(self.fc_norm(self.encoder.forward_features(imgs)[:, 1:].mean(1)))


def build_classifier(args, cfg, num_classes):
    try:
        encoder = ViT(cfg["img_size"], cfg["patch_size"], 3, cfg["dim"], cfg["depth"], cfg["heads"],
                      cfg["pos_embed"], drop_path=args.drop_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.finetune != "scratch" and not args.resume:
        state = load_checkpoint(args.finetune)
        if isinstance(state, dict) and "model" in state:  # a pre-training checkpoint.pt
            state = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
        load_state(encoder, state, f"pre-trained encoder {args.finetune!r}")
    return Classifier(encoder, num_classes)


def batch_mixer(args, num_classes):
    """MixUp / CutMix (torchvision v2), one of them per batch; None when both are off."""
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


def classification_step(net, imgs, labels, mix, smoothing, num_classes):
    """Soft-target cross-entropy on (optionally) mixed images with label smoothing.  -> loss, top-1."""
    if mix is not None:
        imgs, target = mix(imgs, labels)
    else:
        target = F.one_hot(labels, num_classes).float()
    target = target * (1 - smoothing) + smoothing / num_classes
    logits = net(imgs)
    loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


@torch.no_grad()
def evaluate_classifier(model, val_set, args, device, precision, rank, world):
    """Top-1 (%) on the held-out split, split across processes."""
    model.eval()
    data = SeededTransform(val_set, eval_transform(args.img_size), 0)
    idx = list(range(rank, len(data), world))
    loader = DataLoader(Subset(data, idx), args.batch_size, num_workers=args.workers)
    counts = torch.zeros(2, device=device)  # right, seen
    for imgs, y in loader:
        y = y.to(device)
        with autocast(device, precision):
            logits = model(imgs.to(device))
        counts[0] += (logits.argmax(-1) == y).sum()
        counts[1] += len(y)
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return 100.0 * (counts[0] / counts[1]).item()


# ============================================================================================
# Benchmark
# ============================================================================================

def droppos_flops(cfg):
    """Model FLOPs of one pre-training image, counted analytically.

    A linear layer of a token costs 2·in·out FLOPs; attention costs 4·n·D per token (QKᵀ and
    AV); a block on n tokens costs n·(24·D² + 4·n·D) (qkv 3D², proj D², MLP 8D², times 2).
    Backward costs twice the forward of what gets gradients. The attentive pass is one forward
    over all N patches. Norms, softmax and GELU are left out: they are not matmuls.
    """
    D, Dd, N = cfg["dim"], cfg["decoder_dim"], (cfg["img_size"] // cfg["patch_size"]) ** 2
    n = int(N * (1 - cfg["mask_ratio"])) + 1  # + [CLS]
    patch_in = 3 * cfg["patch_size"] ** 2
    block = lambda tokens, d: tokens * (24 * d * d + 4 * tokens * d)
    encoder = cfg["depth"] * block(n, D) + 2 * (n - 1) * patch_in * D
    decoder = 2 * n * D * Dd + cfg["decoder_depth"] * block(n, Dd) + 2 * (n - 1) * Dd * N
    attentive = cfg["depth"] * block(N + 1, D) + 2 * N * patch_in * D
    return 3 * (encoder + decoder) + (attentive if cfg["attentive"] else 0)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def benchmark(args):
    """Time training steps after warm-up on an in-memory batch, then with the data loader."""
    device = pick_device(args.device, 0)
    precision = pick_precision(args.precision, device)
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    model = build_droppos(cfg).to(device)
    optimizer = make_optimizer(param_groups(model, args.weight_decay), 1e-4, (0.9, 0.95), device)
    net = torch.compile(model) if args.compile else model
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    def step(x):
        with autocast(device, precision):
            loss = net(x, 0.5).loss
        optimizer_step(model, optimizer, loss, args.clip_grad)

    rss_before_mb = rss_mb()
    for _ in range(args.bench_warmup):
        step(imgs)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.bench_steps):
        t = time.perf_counter()
        step(imgs)
        sync(device)
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # growth of the process's peak resident memory over what it held before the first step
        # (model, inputs, libraries): activations, gradients and optimiser state. Measured from
        # before warm-up because freed activations stay resident afterwards.
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before_mb
    gflops = droppos_flops(cfg) / 1e9
    peaks = {p: matmul_flops(device, torch.float32 if p == "fp32" else torch.bfloat16) / 1e9
             for p in ("fp32", "bf16")}
    ips = args.batch_size / step_s
    result = {"device": str(device), "precision": precision, "batch_size": args.batch_size,
              "model": {k: cfg[k] for k in ("img_size", "patch_size", "dim", "depth", "heads", "decoder_dim",
                                            "decoder_depth", "decoder_heads")},
              "images_per_sec": round(ips, 1), "step_ms": round(1000 * step_s, 1),
              "peak_memory_mb": round(peak_mb, 1), "gflops_per_image": round(gflops, 3),
              "achieved_gflops": round(ips * gflops, 1),
              "peak_gflops_fp32": round(peaks["fp32"], 1), "peak_gflops_bf16": round(peaks["bf16"], 1),
              "utilization": round(ips * gflops / peaks[precision], 3), "threads": torch.get_num_threads()}
    try:
        result["images_per_sec_with_data"] = round(bench_with_data(args, step, device), 1)
    except UserError as e:
        result["images_per_sec_with_data"], result["data_error"] = None, str(e)
    print(json.dumps(result), flush=True)


def bench_with_data(args, step, device):
    """Images/s of the same step fed by the training stream (load, augment, move to the device)."""
    train_set, _, _ = load_datasets(args)
    it, n, t = iter(TrainStream(train_set, args, 0, 1, False, device).epoch(0)), 0, None
    for i in range(args.bench_warmup + args.bench_steps):
        try:
            imgs, _ = next(it)
        except StopIteration:
            break
        if i == args.bench_warmup:
            sync(device)
            t = time.perf_counter()
        step(imgs)
        if t is not None:
            n += imgs.shape[0]
    sync(device)
    return n / (time.perf_counter() - t) if t and n else float("nan")


# ============================================================================================

def main(argv=None):
    try:
        args = parse_args(argv)
        if args.benchmark:
            benchmark(args)
        else:
            train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
