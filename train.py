"""Pre-train DropPos, watch it learn, evaluate what it learned, and time it.

    python train.py --dataset synthetic --epochs 2           # offline, a minute or two
    python train.py --dataset cifar10                        # pre-train ViT-Tiny/4 on CIFAR-10
    python train.py --resume runs/cifar10-pretrain           # continue a run where it stopped
    python train.py --finetune runs/cifar10-pretrain/checkpoint.pt   # fine-tune what it learned
    python train.py --finetune scratch                       # ... the same from random weights
    python train.py --evaluate runs/cifar10-pretrain/checkpoint.pt        # score it, draw it
    python train.py --location-probe runs/cifar10-pretrain/checkpoint.pt  # how location-aware?
    python train.py --linear-probe runs/cifar10-pretrain/checkpoint.pt    # MAE's linear probe
    python train.py --benchmark                              # images/s, memory, utilisation
    torchrun --nproc_per_node=2 train.py --dataset cifar10   # several processes or GPUs

Checkpoints may come from train.py, the official DropPos code, MAE or timm. Part I teaches: the
loop, then everything one pre-training step touches (tasks, optimiser, CIFAR's data path,
evaluation). Part II protects: flags, checkpoints, run folder and resume, processes, pictures.
"""

import argparse
import ctypes
import datetime
import errno
import fcntl
import functools
import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import repeat
from PIL import Image, ImageChops, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

import droppos
from droppos import PRESETS, DropPos, ViT, patchify, sigma_at, sincos_pos_embed, unpatchify

class UserError(Exception):
    """A problem with what the user asked for: one line, exit code 2, never a traceback."""

##############################################################################################
# Part I: how DropPos is trained. The loop, then everything one pre-training step touches.
##############################################################################################

# 1. The loop ======================================================================================

def train(args):
    """The loop of every mode that trains. Per step: lr -> forward -> backward -> update -> log;
    per epoch: evaluate -> summary and curves -> checkpoint. What differs between pre-training,
    fine-tuning and the probes is the task's; what keeps a run safe is behind `run` and `stop`."""
    proc = start_processes(args)  # torchrun, device, precision
    data = Data(args, proc)
    torch.manual_seed(args.seed)  # seeds, in order: the same initial weights on every process,
    task = TASKS[mode_of(args)](args, data, proc)
    optimizer = make_optimizer(task.groups, task.betas, proc.device)
    torch.manual_seed(args.seed + proc.rank)  # then masks that differ between processes,
    random.seed(args.seed + proc.rank)
    run = RunFolder(args, proc, task, optimizer, data)  # or a resumed run's RNG, weights, step
    if run.epoch == args.epochs:  # resuming a finished run: nothing left to do
        say(f"the run in {run.folder} is complete ({args.epochs} epochs)")
        return task.model
    net = wrap_model(task.model, args, proc)  # torch.compile, DistributedDataParallel
    steps = data.stream.steps  # per epoch
    total, warmup = steps * args.epochs, int(args.warmup_epochs * steps)
    base_lr = args.blr * args.batch_size * proc.world / 256
    log = run.open_log(total)
    say_start(f"{task.name}{task.source}", data, proc,
              f"{task.n_params():,} trainable parameters, lr {base_lr:.2e}, {steps} steps per "
              f"epoch, {args.epochs} epoch{'s' * (args.epochs > 1)}, folder {run.folder}")
    with StopRequest() as stop:
        for epoch in range(run.epoch, args.epochs):  # epochs and steps count from 0 here
            task.model.train()
            for step, (imgs, labels) in data.stream.epoch(epoch, run.first_step(epoch)):
                done = epoch * steps + step  # optimiser steps before this one
                lr = lr_at(done, total, warmup, base_lr, args.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]  # layer-wise decay when fine-tuning
                with autocast(proc):
                    loss, acc = task.step(net, imgs, labels, done / total)
                optimizer_step(task.model, optimizer, loss, args.clip_grad, task.clip_each)
                log.step(epoch, step + 1, loss, acc, len(imgs), lr, task.log_fields(done / total))
                why = stop.agreed(loss, proc)  # None, or why to stop: the same on every process
                if why:
                    run.stop(why, epoch, step + 1, stop.signalled)  # saves or explains; exits
            results = task.evaluate(epoch + 1)
            log.epoch_summary(epoch + 1, results)
            log.draw_curves(task.chance())
            run.save(epoch + 1, 0)
            task.write_outputs(run.folder)
    say(f"run complete: {run.folder}")
    if stop.signalled:  # came during the last evaluation: the run is whole, yet a shell loop stops
        raise SystemExit(128 + stop.signalled)
    return task.model

# 2. The tasks: pre-training, fine-tuning, the probes ==============================================

class Task:
    """What the loop asks of every mode: a model, parameter groups, betas, a step, an evaluation."""

    acc_name, acc_key, betas = "train top-1", "train_top1", (0.9, 0.999)  # console, metrics.jsonl

    def __init__(self, args, data, proc):
        self.args, self.data, self.proc = args, data, proc
        self.source = source_line(args)  # where the weights come from, for the start-up line
        self.clip_each = switch(args.recipe, self.mode, "clip_each")  # `optimizer_step`

    def n_params(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def evaluate(self, epochs_done=None):  # a classifier's top-1 on the held-out images
        return {"test_top1": evaluate_classifier(self.model, self.data, self.args, self.proc)}

    def chance(self):  # metrics.jsonl key -> its chance value, for curves.png
        return {"test_top1": 100 / self.data.num_classes}

    def log_fields(self, progress):  # extra numbers for the progress line
        return {}

    def write_outputs(self, folder):  # files besides checkpoint.pt
        pass

class Pretraining(Task):
    """DropPos (droppos.py): its step, the held-out position scores and k-NN monitor, and what a
    pre-training run leaves besides its checkpoint (encoder.pt, reassembly.png)."""

    name, mode, acc_name, acc_key = "pre-training", "pretrain", "pos-acc", "pos_top1"
    betas = (0.9, 0.95)  # MAE's and the official DropPos code's

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        self.model = build_droppos(model_config(args)).to(proc.device)
        self.groups = param_groups(self.model, args.weight_decay,
                                   no_decay=no_decay_rule(args.recipe, self.mode))
        self.vis_imgs = picture_images(data) if proc.rank == 0 else None
        self.beliefs = None  # the position head's predictions on the held-out images, to draw

    def sigma(self, progress):
        return sigma_at(self.args.sigma, progress, decay=not self.args.no_sigma_decay)

    def step(self, net, imgs, labels, progress):  # -> loss, position accuracy
        out = net(imgs, self.sigma(progress))
        return out.loss, out.acc

    def log_fields(self, progress):
        return {"sigma": self.sigma(progress)}

    def evaluate(self, epochs_done=None):
        """The position head's held-out scores; k-NN every --knn-every epochs and at the end."""
        results, self.beliefs = head_positions(self.model, self.data, self.args, self.proc)
        n, every = epochs_done, self.args.knn_every
        if every and n and (n == self.args.epochs or n % every == 0):
            results["knn_top1"] = run_knn(self.model.encoder, self.data, self.args, self.proc)
        return results

    def chance(self):
        return dict(chance_of_grid(self.model.grid, "test_pos"),
                    knn_top1=100 / self.data.num_classes,
                    pos_top1=100 / self.model.encoder.num_patches)

    def write_outputs(self, folder):
        """encoder.pt (timm's key names) and reassembly.png, from rank 0."""
        if self.proc.rank == 0:
            encoder = self.model.encoder.state_dict()
            atomic_write(folder / "encoder.pt", lambda f: torch.save(encoder, f))
            save_reassembly(self.model, self.vis_imgs, folder / "reassembly.png", self.proc,
                            self.beliefs.get("test_pos"))  # this epoch's `evaluate`

class Finetuning(Task):
    """A classifier on the pre-trained (or a random) encoder: MAE's fine-tuning recipe, layer-wise
    lr decay, MixUp/CutMix, label smoothing, and top-1 on the held-out images every epoch."""

    name, mode = "fine-tuning", "finetune"

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        self.model = build_classifier(args, data.num_classes).to(proc.device)
        depth = len(self.model.encoder.blocks)
        self.groups = param_groups(self.model, args.weight_decay,
                                   lambda n: args.layer_decay ** (depth + 1 - layer_id(n, depth)),
                                   no_decay=no_decay_rule(args.recipe, self.mode))
        mixers = [mix(alpha=a, num_classes=data.num_classes)
                  for mix, a in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if a > 0]
        self.mix = v2.RandomChoice(mixers) if mixers else None  # one of them per batch

    def step(self, net, imgs, labels, progress):
        """Cross-entropy, label smoothing on MixUp/CutMix's probabilities too -> loss, top-1."""
        imgs, target = self.mix(imgs, labels) if self.mix else (imgs, labels)
        logits = net(imgs)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.args.smoothing)
        return loss, (logits.argmax(-1) == labels).float().mean()

class Classifier(nn.Module):
    """The ViT under a head: mean patch token, LayerNorm, linear. mae_head pools without the
    encoder's norm, as MAE; the norm stays so weights load, frozen (DDP refuses unused ones)."""

    def __init__(self, encoder, num_classes, mae_head=False):
        super().__init__()
        self.encoder, self.mae_head = encoder, mae_head
        self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head starts stable
        nn.init.zeros_(self.head.bias)
        encoder.norm.requires_grad_(not mae_head)

    def forward(self, imgs):  # (B, C, H, W) -> (B, classes)
        tokens = self.encoder.forward_features(imgs, final_norm=not self.mae_head)
        return self.head(self.fc_norm(tokens[:, 1:].mean(1)))

class FrozenEncoder(nn.Module):
    """A probe's base: frozen means frozen, so the encoder never leaves eval mode."""

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()
        return self

class LocationProbe(FrozenEncoder):
    """The paper's location probe on a frozen encoder: every patch visible, the position embeddings
    of a random `pos_mask_ratio` of them replaced by one learned vector (zero at start). Linear
    heads predict the positions of those patches (`head`) and of the others (`control`)."""

    def __init__(self, encoder, pos_mask_ratio):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        N = encoder.num_patches
        self.n_drop = N - int(N * (1 - pos_mask_ratio))
        if self.n_drop < 1:  # a tiny ratio drops nothing: 1 - 1e-20 == 1.0
            raise UserError(f"--pos-mask-ratio {pos_mask_ratio} drops none of the {N} positions")
        self.mask_vector = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        self.head, self.control = nn.Linear(encoder.dim, N), nn.Linear(encoder.dim, N)

    def forward(self, imgs):  # (B, C, H, W) -> logits of head and control (B, N, N), dropped (B, N)
        enc, B, N = self.encoder, len(imgs), self.encoder.num_patches
        ids = droppos.random_masking(B, N, self.n_drop, device=imgs.device)
        dropped = torch.zeros(B, N, dtype=torch.bool, device=imgs.device).scatter(1, ids, True)
        pos = torch.where(dropped[..., None], self.mask_vector, enc.pos_embed[:, 1:])  # (B, N, D)
        feats = enc.encode(enc.patch_embed(patchify(imgs, enc.patch_size)) + pos)[:, 1:]
        return self.head(feats), self.control(feats), dropped

class LinearProbe(FrozenEncoder):
    """MAE's linear probe (BatchNorm without affine parameters, then linear) on a frozen encoder
    run without gradient, over the mean patch token, k-NN's feature (MAE's default reads [CLS])."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.bn = nn.BatchNorm1d(encoder.dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE's linear-probe initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):  # (B, C, H, W) -> (B, classes)
        with torch.no_grad():
            feats = self.encoder.forward_features(imgs)[:, 1:].mean(1)
        return self.head(self.bn(feats.float()))

class LocationProbing(Task):
    name, mode = "location probe", "location_probe"

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        self.model = LocationProbe(build_encoder(args), args.pos_mask_ratio).to(proc.device)
        self.groups = param_groups(self.model, args.weight_decay)

    def step(self, net, imgs, labels, progress):  # -> loss, top-1 over the dropped positions
        head, control, dropped = net(imgs)
        truth = torch.arange(head.shape[1], device=imgs.device).expand(len(imgs), -1)  # raster
        loss = F.cross_entropy(head[dropped].float(), truth[dropped])
        if (~dropped).any():
            loss = loss + F.cross_entropy(control[~dropped].float(), truth[~dropped])
        return loss, (head.argmax(-1) == truth)[dropped].float().mean()

    def evaluate(self, epochs_done=None):  # each epoch, on the held-out images, masks seeded alike
        return probe_positions(self.model, self.data, self.args, self.proc)

    def chance(self):
        grid = self.model.encoder.grid
        return chance_of_grid(grid, "probe") | chance_of_grid(grid, "control")

class LinearProbing(Task):
    name, mode = "linear probe", "linear_probe"

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        self.model = LinearProbe(build_encoder(args), data.num_classes).to(proc.device)
        self.groups = param_groups(self.model, args.weight_decay)

    def step(self, net, imgs, labels, progress):  # -> loss, training top-1
        logits = net(imgs)
        return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean()

TASKS = {"pretrain": Pretraining, "finetune": Finetuning, "location_probe": LocationProbing,
         "linear_probe": LinearProbing}

def model_config(args):
    """DropPos constructor arguments: the preset, then any size overrides."""
    cfg = {k: v if getattr(args, k) is None else getattr(args, k)
           for k, v in PRESETS[args.model].items()}
    return dict(cfg, img_size=args.img_size, patch_size=args.patch_size, mask_ratio=args.mask_ratio,
                pos_mask_ratio=args.pos_mask_ratio, pos_embed=args.pos_embed,
                attentive=not args.no_attentive, tau=args.tau)

def build_droppos(cfg):
    try:
        return DropPos(**cfg)
    except ValueError as e:  # a shape the model cannot take, e.g. heads that do not divide dim
        raise UserError(str(e)) from None

# 3. Optimiser and schedule ========================================================================

# Which parameters AdamW leaves undecayed, by the recipe's `no_decay` switch: (name, p) -> bool.
NO_DECAY = {  # laptop: biases, norms, tokens ([CLS], [MASK]) and position embeddings
    "laptop": lambda name, p: p.ndim <= 1 or name.endswith(("token", "pos_embed")),
    # official pre-training, timm's add_weight_decay without a skip list: the (1, 1, D) tokens decay
    "1-D and biases": lambda name, p: p.ndim <= 1 or name.endswith(".bias"),
    # MAE's param_groups_lrd: 1-D parameters and the ViT's no_weight_decay() names
    "1-D and ViT's": lambda name, p: (p.ndim <= 1 or name.removeprefix("encoder.")
                                      in ("pos_embed", "cls_token")),
}

def no_decay_rule(recipe_name, mode):
    return NO_DECAY[switch(recipe_name, mode, "no_decay")]

def param_groups(model, weight_decay, lr_scale=None, no_decay=NO_DECAY["laptop"]):
    """AdamW groups of the trainable parameters: no weight decay where no_decay(name, param), and
    an lr scale per parameter (fine-tuning's layer-wise decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = bool(no_decay(name, p))
        scale = lr_scale(name) if lr_scale else 1.0
        group = {"params": [], "weight_decay": 0.0 if skip else weight_decay, "lr_scale": scale}
        groups.setdefault((skip, scale), group)["params"].append(p)
    return list(groups.values())

def make_optimizer(groups, betas, device, lr=1e-4):  # the loop sets each step's lr
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))

def optimizer_step(model, optimizer, loss, clip_grad, per_parameter=False):
    """Backward, clip the gradients' joint norm (0: none) or, per_parameter, each one's own (the
    official pre-training's: no layer's large gradient shrinks the others), update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        for group in [[p] for p in params] if per_parameter else [params]:
            nn.utils.clip_grad_norm_(group, clip_grad)  # g *= min(1, clip / (‖g‖ + 1e-6))
    optimizer.step()

def lr_at(step, total, warmup, base_lr, min_lr):
    """Linear warm-up, then half-cosine to min_lr, per optimiser step."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

def layer_id(name, depth):
    """Depth of a fine-tuning parameter for layer-wise lr decay: embeddings 0, block i → i+1."""
    if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1

# 4. Data: the path CIFAR takes ====================================================================

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as MAE normalises

class Data:
    """The training stream (None for --evaluate), the held-out images, the class count."""

    def __init__(self, args, proc):
        self.args, mode = args, mode_of(args)
        self.train, self.held_out, self.num_classes = load_datasets(args)
        if mode != "evaluate" and len(self.train) < args.batch_size * proc.world:
            raise UserError(f"the training set has {len(self.train)} images, fewer than one batch "
                            f"({args.batch_size} × {proc.world} processes); lower --batch-size")
        targets = torch.tensor(self.train.dataset.targets, dtype=torch.long)
        self.per_class = targets[self.train.indices].bincount(minlength=self.num_classes).tolist()
        warn_about_split_names(self.train.dataset, args.data_dir)
        self.stream = (TrainStream(self.train, args, proc.rank, proc.world, mode, proc.device)
                       if mode != "evaluate" else None)

    def describe(self):
        """The start-up line's account of the data."""
        a, (h, w) = self.args, droppos.grid_size(self.args.img_size, self.args.patch_size)
        return (f"{len(self.train)} images in {self.num_classes} classes "
                f"({min(self.per_class)}-{max(self.per_class)} per class), {a.img_size} px, "
                f"patch {a.patch_size}, grid {h}x{w}")

def load_datasets(args):
    """(train, held_out, num_classes), untransformed; --per-class cuts train, --classes both."""
    if args.dataset == "synthetic":
        train = SyntheticImages(args.synthetic_size, args.img_size, args.seed)
        held_out = SyntheticImages(max(args.synthetic_size // 5, 10), args.img_size, args.seed + 1)
    elif args.dataset in ("cifar10", "cifar100"):
        train, held_out = load_cifar(args)
    else:
        train, held_out = load_imagefolder(args)
    num_classes = min(len(set(train.targets)), args.classes or math.inf)
    keep = take_classes(train.targets, args.classes, args.per_class)
    if held_out is None:  # a deterministic hold-out: every 10th kept image
        held_out, keep = Subset(train, keep[::10]), [i for j, i in enumerate(keep) if j % 10]
    else:
        held_out = Subset(held_out, take_classes(held_out.targets, args.classes, None))
    return Subset(train, keep), held_out, num_classes

def take_classes(targets, classes, per_class):
    """Indices of the images of the first `classes` classes, at most `per_class` each, in order."""
    keep, seen = [], {}
    for i, c in enumerate(targets):
        if (classes is None or c < classes) and seen.get(c, 0) < (per_class or math.inf):
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    return keep

class TrainStream:
    """This process's training batches on the device: small images held in memory, augmented a
    batch at a time, photos one by one; seeded by epoch and step or image, for exact resume."""

    def __init__(self, train_set, args, rank, world, mode, device):
        self.args, self.rank, self.device = args, rank, device
        finetune = mode not in PRETRAIN  # the probes augment as fine-tuning does, as in MAE
        self.scale = crop_scale(finetune)
        # MAE's fine-tuning augmentation (RandAugment, RandomErasing) is per image, for any size.
        mae_augment = switch(args.recipe, mode, "mae_augment")
        stored = None if mae_augment else decode_in_memory(train_set, args.img_size)
        self.in_memory = stored is not None
        if self.in_memory:
            self.data = torch.utils.data.TensorDataset(*stored)
        else:
            transform = train_transform(args.img_size, finetune, mae_augment)
            self.data = SeededTransform(train_set, transform, args.seed)
        # Indexing a tensor needs no loader processes: they would only compete for the cores.
        self.workers = 0 if self.in_memory else args.workers
        self.sampler = DistributedSampler(self.data, world, rank, seed=args.seed, drop_last=True)
        self.steps = len(self.sampler) // args.batch_size  # per epoch

    def epoch(self, epoch, start_step=0):
        """(step, (images, labels)) on the device for each step of `epoch` from start_step on."""
        a = self.args
        self.sampler.set_epoch(epoch)
        if not self.in_memory:
            self.data.epoch = epoch
        order = list(self.sampler)[start_step * a.batch_size:]  # a resumed epoch starts mid-way
        # The generator keeps the loader from drawing its seed from the global RNG (exact resume).
        loader = DataLoader(self.data, a.batch_size, sampler=order, drop_last=True,
                            num_workers=self.workers,
                            generator=torch.Generator().manual_seed(a.seed))
        for step, (imgs, labels) in enumerate(loader, start_step):
            imgs = imgs.to(self.device, non_blocking=True)
            if self.in_memory:
                g = torch.Generator().manual_seed(mix_seed(a.seed, epoch, step, self.rank))
                imgs = augment_batch(imgs, a.img_size, self.scale, g)
            yield step, (imgs, labels.to(self.device, non_blocking=True))

def mix_seed(*parts):
    """One 63-bit seed from several integers, different for different tuples in practice."""
    return functools.reduce(lambda h, p: (h * 1_000_003 + p) % 2 ** 63, parts, 0)

def crop_scale(finetune):
    # Paper: RandomResizedCrop(scale 0.2-1) + flip to pre-train; MAE's fine-tuning crops from 0.08.
    return (0.08 if finetune else 0.2, 1.0)

def augment_batch(imgs, size, scale, generator):
    """`train_transform` for a uint8 batch (B, 3, S, S) on its device -> (B, 3, size, size)."""
    # RandomResizedCrop for a whole batch in one grid_sample call: saves ~1 ms of PIL per image.
    boxes = random_crop_boxes(len(imgs), *imgs.shape[2:], scale, generator)
    flip = torch.rand(len(imgs), generator=generator) < 0.5
    # Bicubic overshoots; clamping matches what resampling 8-bit images gives.
    crops = resample_crops(imgs.float() / 255, boxes, flip, size).clamp(0, 1)
    return v2.functional.normalize(crops, MEAN, STD)  # as the per-image transforms do

def random_crop_boxes(n, height, width, scale, generator, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop's boxes, drawn as torchvision does -> (n, 4): top, left, height, width."""
    # Area share uniform in `scale`, aspect ratio log-uniform in `ratio`: the first of `tries`
    # draws that fits, else the whole image (torchvision's fallback for a square image).
    area = torch.empty(n, tries).uniform_(*scale, generator=generator) * height * width
    aspect = torch.empty(n, tries).uniform_(*map(math.log, ratio), generator=generator).exp()
    hw = torch.stack([(area / aspect).sqrt(), (area * aspect).sqrt()], -1).round()  # (n, tries, 2)
    image = torch.tensor([height, width], dtype=torch.float)
    fits = ((hw >= 1) & (hw <= image)).all(-1)  # (n, tries)
    hw = torch.where(fits.any(1, keepdim=True), hw[torch.arange(n), fits.int().argmax(1)], image)
    corner = (torch.rand(2, n, generator=generator).T * (image - hw + 1)).floor()  # uniform
    return torch.cat([corner, hw], 1)

def resample_crops(imgs, boxes, flip, size):
    """Every image's box resized to size×size (bicubic) in one grid_sample call, mirrored where
    flip.  imgs: (B, C, H, W) float; boxes: (B, 4) as `random_crop_boxes`; flip: (B,) bool."""
    B, C, H, W = imgs.shape
    top, left, h, w = boxes.unbind(1)
    # affine_grid maps the output's edges ([-1, 1], align_corners=False) onto the box's edges.
    zero, sx = torch.zeros_like(w), torch.where(flip, -w, w)  # a negative x scale mirrors
    theta = torch.stack([sx / W, zero, (2 * left + w) / W - 1,
                         zero, h / H, (2 * top + h) / H - 1], 1).view(B, 2, 3)
    grid = F.affine_grid(theta.to(imgs.device), [B, C, size, size], align_corners=False)
    return F.grid_sample(imgs, grid, mode="bicubic", padding_mode="border", align_corners=False)

# 5. Evaluation: k-NN, top-1, position scores ======================================================

def eval_batches(images, args, proc, batch_size):
    """This process's share of a set of images, unaugmented, as (images, labels) on the device."""
    ds = SeededTransform(images, eval_transform(args.img_size, eval_crop_pct(args)), 0)
    shard = Subset(ds, range(proc.rank, len(ds), proc.world))
    for imgs, labels in DataLoader(shard, batch_size, num_workers=args.workers):
        yield imgs.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)

@torch.no_grad()
def extract_features(encoder, batches, proc):
    """L2-normalised mean patch token per image, every process's, in rank order -> (M, D), (M,)."""
    feats = [torch.zeros(0, encoder.dim, device=proc.device)]  # for a process with no images
    labels = [torch.zeros(0, dtype=torch.long, device=proc.device)]
    for imgs, y in batches:
        with autocast(proc):
            f = encoder.forward_features(imgs)[:, 1:].mean(1)
        feats.append(F.normalize(f.float(), dim=-1))
        labels.append(y)
    if proc.world == 1:
        return torch.cat(feats), torch.cat(labels)
    shares = [None] * proc.world  # once per k-NN pass: gathering CPU tensors is fast enough
    dist.all_gather_object(shares, (torch.cat(feats).cpu(), torch.cat(labels).cpu()))
    return tuple(torch.cat(parts).to(proc.device) for parts in zip(*shares))

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

def run_knn(encoder, data, args, proc):
    """k-NN top-1 (%) on the held-out images, the training images the bank, split by process."""
    encoder.eval()
    bank_f, bank_y = extract_features(encoder, eval_batches(data.train, args, proc, 256), proc)
    test_f, test_y = extract_features(encoder, eval_batches(data.held_out, args, proc, 256), proc)
    encoder.train()
    pred = knn_classify(bank_f, bank_y, test_f, data.num_classes)
    return 100.0 * (pred == test_y).float().mean().item()

@torch.no_grad()
def evaluate_classifier(model, data, args, proc):
    """Top-1 (%) on the held-out images, split across processes."""
    model.eval()
    counts = torch.zeros(2, device=proc.device)  # right, seen
    for imgs, y in eval_batches(data.held_out, args, proc, args.batch_size):
        with autocast(proc):
            logits = model(imgs)
        counts[0] += (logits.argmax(-1) == y).sum()
        counts[1] += len(y)
    if proc.world > 1:
        dist.all_reduce(counts)
    model.train()
    return 100.0 * (counts[0] / counts[1].clamp(min=1)).item()

def head_positions(model, data, args, proc):
    """The DropPos position head on the held-out images, without the loss or its attentive pass:
    the scores of the patches whose position was dropped (test_pos_*) and what the picture draws."""
    def predict(imgs):
        tokens, ids_keep, dropped = model.embed_visible(imgs)
        return {"test_pos": (model.decoder(model.encoder.encode(tokens)), ids_keep, dropped)}
    return held_out_positions(predict, data, args, proc, model.grid)

def probe_positions(probe, data, args, proc):
    """The location probe on the held-out images: its measure and its control."""
    def predict(imgs):
        head, control, dropped = probe(imgs)
        truth = torch.arange(head.shape[1], device=imgs.device).expand(len(imgs), -1)
        return {"probe": (head, truth, dropped), "control": (control, truth, ~dropped)}
    return held_out_positions(predict, data, args, proc, probe.encoder.grid, keep=0)[0]

@torch.no_grad()
def held_out_positions(predict, data, args, proc, grid, keep=20_000):
    """Position scores on the held-out images, split by process, of each group predict(imgs) ->
    {name: (logits (B, n, N), true cells (B, n), scored (B, n) bool)} returns, and for pictures
    {name: (probs (M, N), true cells (M,))} of up to `keep` patches. Masks are seeded by --seed
    (every epoch scores the same patches) in a forked RNG (exact resume)."""
    sums, kept = {}, {}
    with torch.random.fork_rng([proc.device] if proc.device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        for imgs, _ in eval_batches(data.held_out, args, proc, 256):
            with autocast(proc):
                groups = predict(imgs)
            for name, (logits, true, scored) in groups.items():
                probs, true = logits[scored].float().softmax(-1), true[scored]
                s = position_scores(probs, true, grid)
                # no patch scored (the control at --pos-mask-ratio 1): NaN scores, counted 0 times
                s = torch.tensor([s["top1"], s["within1"], s["distance"], 1.0]).nan_to_num()
                sums[name] = sums.get(name, 0) + s * len(true)  # weighted by the patches scored
                p, t = kept.setdefault(name, ([], []))
                if sum(map(len, t)) < keep:  # until the picture has enough
                    p.append(probs.cpu())
                    t.append(true.cpu())
    results = {}
    for name, s in sorted(sums.items()):
        if proc.world > 1:
            s = s.to(proc.device)
            dist.all_reduce(s)
        if s[3] == 0:  # no patch of this group, e.g. the control at --pos-mask-ratio 1
            continue
        top1, within1, distance = (s[:3] / s[3]).tolist()
        results |= {f"{name}_top1": 100 * top1, f"{name}_within1": 100 * within1,
                    f"{name}_distance": distance}
    pictured = {k: (torch.cat(p)[:keep], torch.cat(t)[:keep]) for k, (p, t) in kept.items() if p}
    return results, pictured

def position_scores(probs, true_pos, grid):
    """probs (M, N) (the argmax counts), true_pos (M,), grid (h, w) -> top1, within1 (Chebyshev
    distance <= 1) as fractions, distance in cells; chance_*: the same for a uniform guess."""
    h, w = grid
    k = torch.arange(h * w, device=probs.device)
    xy = torch.stack([k // w, k % w], 1).double()  # (N, 2); float64 so the chances are exact
    s = {}
    for pre, d in (("", xy[probs.argmax(1)] - xy[true_pos]), ("chance_", xy[:, None] - xy[None])):
        d = d.view(-1, 2)  # (M or N*N, 2) row and column offsets of the guess from the truth
        s |= {pre + "top1": (d == 0).all(1).double().mean().item(),
              pre + "within1": (d.abs().amax(1) <= 1).double().mean().item(),
              pre + "distance": d.norm(dim=1).mean().item()}
    return s

def chance_of_grid(grid, name):
    """What a uniform guess over the grid scores, under held_out_positions' names."""
    s = position_scores(torch.zeros(1, grid[0] * grid[1]), torch.zeros(1, dtype=torch.long), grid)
    return {f"{name}_top1": 100 * s["chance_top1"], f"{name}_within1": 100 * s["chance_within1"],
            f"{name}_distance": s["chance_distance"]}

##############################################################################################
# Part II: what keeps runs safe, and the tools around the loop
##############################################################################################

# 6. The command line: each flag's facts in one place, the recipes as data =========================

DATASETS = {"cifar10": 32, "cifar100": 32, "imagefolder": 224, "synthetic": 32}  # image size
# What a command does: the flag that chose it (at most one), else pre-training.
MODES = ("benchmark", "evaluate", "finetune", "location_probe", "linear_probe")
PRETRAIN = {"pretrain", "benchmark"}  # --benchmark times pre-training steps
TRAINS = {"pretrain", "finetune", "location_probe", "linear_probe"}  # the modes with a run
STEPS = TRAINS | {"benchmark"}  # the modes that take optimiser steps
BENCH_WARMUP, BENCH_STEPS = 3, 10  # --benchmark's untimed, then timed steps

# --recipe: per mode, defaults of the flags not typed, and switches no flag sets (`switch`). laptop
# suits short CPU runs; paper is the official DropPos pre-training (main_pretrain.py,
# pretrain_base.sh) and MAE's fine-tuning as DropPos runs it; with parser defaults: a whole recipe.
SWITCHES = dict(no_decay="laptop", clip_each=False, mae_head=False, mae_augment=False,
                eval_crop=1.0)
RECIPES = {
    "laptop": {"pretrain": dict(blr=2e-3), "finetune": dict(blr=1e-3),
               "probe": dict(blr=1e-2, weight_decay=0.0)},  # a linear head on frozen features
    "paper": {"every mode": dict(eval_crop=224 / 256),
              "pretrain": dict(blr=1.5e-4, warmup_epochs=10.0, min_lr=0.0, weight_decay=0.05,
                               clip_grad=5.0, decoder_dim=512, decoder_depth=2, decoder_heads=16,
                               no_decay="1-D and biases", clip_each=True),
              "finetune": dict(blr=1e-3, warmup_epochs=5.0, min_lr=1e-6, weight_decay=0.05,
                               clip_grad=0.0, layer_decay=0.75, drop_path=0.1, smoothing=0.1,
                               mixup=0.8, cutmix=1.0, no_decay="1-D and ViT's", mae_head=True,
                               mae_augment=True),
              "probe": dict(blr=1e-2, weight_decay=0.0)},  # MAE: LARS, batch 16384; AdamW here
}

def recipe(name, mode):
    """What --recipe `name` sets in `mode` (probes share a column, --benchmark pre-training's)."""
    column = "probe" if mode.endswith("probe") else "pretrain" if mode == "benchmark" else mode
    return {**RECIPES[name].get("every mode", {}), **RECIPES[name].get(column, {})}

def switch(recipe_name, mode, key):
    """One of the recipe's SWITCHES for a mode."""
    return recipe(recipe_name, mode).get(key, SWITCHES[key])

def number(kind, low, high=math.inf, low_in=True, high_in=False):
    """An argparse type: a `kind` in the range (NaN fails every comparison, so it is refused)."""
    def parse(text):
        v = kind(text)
        if (v >= low if low_in else v > low) and (v <= high if high_in else v < high):
            return v
        bounds = (f"{'>=' if low_in else '>'} {low}" if high == math.inf else
                  f"in {'[(' [not low_in]}{low}, {high}{'])' [not high_in]}")
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse

def checkpoint(text):
    """An argparse type for a checkpoint flag: a file, or a run's folder for its checkpoint.pt."""
    inside = Path(text, "checkpoint.pt")
    return str(inside) if text not in ("scratch", "random") and inside.is_file() else text

COUNT, NATURAL = number(int, 1), number(int, 0)
SIZE = number(int, 1, 2 ** 31)  # a tensor's side: torch fails on larger ones with a TypeError
SHARE, POSITIVE, NONNEGATIVE = number(float, 0, 1), number(float, 0, low_in=False), number(float, 0)
SHARE_OR_ALL = number(float, 0, 1, low_in=False, high_in=True)  # (0, 1]

class Parser(argparse.ArgumentParser):
    def error(self, message):  # a typo is bad input like any other: one line, exit code 2
        message = re.sub(r"^argument (\S+): must", r"\1 must", message)  # from `number`
        raise UserError(f"{message} (see --help)")

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each flag's default after its help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # the help explains it, if needed
            return action.help
        return super()._get_help_string(action)

def build_parser():
    """Every flag once: group, type (which checks its range), default, help, the modes and datasets
    it `applies` to (all if it names none), `free` (--resume may change it), encoder `shape`."""
    p = Parser(description=__doc__, formatter_class=HelpFormatter)

    def group(title):
        g = p.add_argument_group(title)

        def add(name, help, applies=None, free=False, shape=False, **kw):
            action = g.add_argument(name, help=help, **kw)
            action.applies, action.free, action.shape = applies, free, shape
        return add

    add = group("data")
    add("--dataset", "what to train on; synthetic needs no download", default="cifar10",
        choices=list(DATASETS))
    add("--data-dir", "where CIFAR goes; for imagefolder, a folder per class of training images",
        {"cifar10", "cifar100", "imagefolder"}, default="data", free=True)
    add("--val-dir", "imagefolder: held-out images, a folder per class (default: every 10th "
        "training image)", TRAINS | {"evaluate", "imagefolder"}, free=True)
    add("--classes", "keep only the first K classes (default: all)", type=COUNT)
    add("--per-class", "keep the first M training images of each class (default: all)", type=COUNT)
    add("--synthetic-size", "synthetic: number of training images", {"synthetic"}, type=COUNT,
        default=2048)
    add("--workers", "loader processes for photos (default: 0 on a CPU, 8 on a GPU)",
        type=NATURAL, free=True)

    add = group("model")
    add("--model", "encoder and decoder preset", default="tiny", choices=sorted(PRESETS))
    add("--img-size", "training resolution (default: 32 for CIFAR and synthetic, 224 for "
        "imagefolder)", type=SIZE, shape=True)
    add("--patch-size", "patch size (default: 4 at 32 px, else 16)", type=SIZE, shape=True)
    for name, what, applies in [("dim", "encoder width", None), ("depth", "encoder blocks", None),
                                ("heads", "encoder heads", None),
                                ("decoder-dim", "decoder width", PRETRAIN | {"evaluate"}),
                                ("decoder-depth", "decoder blocks", PRETRAIN | {"evaluate"}),
                                ("decoder-heads", "decoder heads", PRETRAIN | {"evaluate"})]:
        add(f"--{name}", f"{what} (default: the preset's)", applies, type=SIZE,
            shape=not applies)

    add = group("method (paper section 3; each ablation is one flag)")
    add("--mask-ratio", "γ: share of patches hidden", PRETRAIN, type=SHARE, default=0.75)
    add("--pos-mask-ratio", "γ_pos: share of visible patches whose position embedding is dropped",
        PRETRAIN | {"location_probe"}, type=SHARE_OR_ALL, default=0.75)
    add("--sigma", "σ0 of position smoothing (0: one-hot)", PRETRAIN, type=NONNEGATIVE,
        default=1.0)
    add("--no-sigma-decay", "keep σ = σ0, not decaying to 0", PRETRAIN, action="store_true")
    add("--no-attentive", "uniform loss weights", PRETRAIN, action="store_true")
    add("--tau", "τ: temperature of attentive reconstruction", PRETRAIN, type=POSITIVE, default=0.1)
    add("--pos-embed", "fixed 2-D sin-cos position embedding, or a learned one", default="sincos",
        choices=["sincos", "learnable"], shape=True)

    add = group("optimisation")
    add("--recipe", "laptop: defaults for small runs on a CPU budget. paper: the official DropPos "
        "pre-training and MAE's fine-tuning as DropPos runs it, 224/256 evaluation crop (RECIPES "
        "in train.py lists every value). Flags you type win over either",
        default="laptop", choices=sorted(RECIPES))
    add("--epochs", "length of the run", TRAINS, type=COUNT, default=100)
    add("--batch-size", "images per step and process", type=COUNT, default=64)
    add("--blr", "base lr; lr = blr × total batch / 256 (default: 2e-3 for pre-training, 1e-3 "
        "for fine-tuning, 1e-2 for the probes)", TRAINS, type=POSITIVE)
    add("--min-lr", "lr at the end of the cosine", TRAINS, type=NONNEGATIVE, default=0.0)
    add("--warmup-epochs", "linear lr warm-up", TRAINS, type=NONNEGATIVE, default=1.0)
    add("--weight-decay", "AdamW weight decay", STEPS, type=NONNEGATIVE, default=0.05)
    add("--clip-grad", "gradient-norm clipping (0 = none)", STEPS, type=NONNEGATIVE, default=5.0)
    add("--seed", "seeds data order, augmentation, masking, init",
        type=number(int, -2 ** 63, 2 ** 64 - 2 ** 10), default=0)  # torch's range, room for + rank

    add = group("fine-tuning")
    add("--finetune", "train a classifier on a checkpoint's encoder, or a random one",
        metavar="CHECKPOINT|scratch", type=checkpoint)
    add("--layer-decay", "layer-wise lr decay", {"finetune"}, type=SHARE_OR_ALL, default=0.75)
    add("--drop-path", "stochastic depth of the last block", {"finetune"}, type=SHARE, default=0.1)
    add("--smoothing", "label smoothing", {"finetune"}, type=SHARE, default=0.1)
    add("--mixup", "MixUp alpha (0 = off)", {"finetune"}, type=NONNEGATIVE, default=0.8)
    add("--cutmix", "CutMix alpha (0 = off)", {"finetune"}, type=NONNEGATIVE, default=1.0)

    add = group("evaluation and probes (any checkpoint: train.py's, the official DropPos code's, "
                "MAE's, timm's)")
    add("--evaluate", "train nothing: position scores, k-NN, a classifier's top-1, the picture",
        metavar="CHECKPOINT", type=checkpoint)
    add("--location-probe", "the paper's location probe: frozen encoder, --pos-mask-ratio of the "
        "position embeddings replaced by one learned vector", metavar="CHECKPOINT|random",
        type=checkpoint)
    add("--linear-probe", "MAE's linear probe: frozen encoder, BatchNorm, linear classifier",
        metavar="CHECKPOINT|random", type=checkpoint)

    add = group("output and evaluation")
    add("--output-dir", "the run's folder (default: runs/ and a name from the dataset or the "
        "checkpoint's run, the mode, the recipe and the seed)",
        TRAINS | {"evaluate"}, free=True)
    add("--resume", "continue the run in FOLDER exactly where it stopped, with its flags",
        metavar="FOLDER|CHECKPOINT", free=True)
    add("--knn-every", "k-NN monitor every N epochs and at the end (0 = off)", {"pretrain"},
        type=NATURAL, default=10, free=True)
    add("--log-every", "seconds between progress lines (0 = every step)", TRAINS,
        type=NONNEGATIVE, default=5.0, free=True)

    add = group("hardware")
    add("--device", "auto: a GPU if present", default="auto", choices=["auto", "cpu", "cuda"],
        free=True)
    add("--precision", "auto: bf16 autocast on a GPU, and on a CPU with bf16 matmul units",
        default="auto", choices=["auto", "bf16", "fp32"], free=True)
    add("--compile", "torch.compile the model: minutes of start-up; on a 2-core CPU no faster "
        "step", STEPS,
        action="store_true", free=True)

    add = group("benchmark")
    add("--benchmark", f"time {BENCH_STEPS} training steps after {BENCH_WARMUP} untimed ones and "
        "print one JSON line", action="store_true")
    return p

FLAGS = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
FREE_ON_RESUME = {name for name, a in FLAGS.items() if a.free}
ENCODER_SHAPE = tuple(name for name, a in FLAGS.items() if a.shape)

def parse_args(argv=None):
    """The run's flags: the command line checked and completed, or a resumed run's own."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # parse again with every default suppressed: what was typed
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    if args.resume:
        return resumed_args(args, given)
    check_mode_flags(args, given)
    check_applies(given, mode_of(args), args.dataset)
    complete_args(args, given)
    return args

def flag(name):
    return "--" + name.replace("_", "-")

def mode_of(args):
    """'pretrain', or the mode flag given: 'finetune', 'evaluate', 'location_probe', ..."""
    return next((m for m in MODES if getattr(args, m, None)), "pretrain")

def source_of(args):
    """The checkpoint the mode starts from; None for pre-training, scratch and random weights."""
    path = getattr(args, mode_of(args), None)
    return path if isinstance(path, str) and path not in ("scratch", "random") else None

def check_mode_flags(args, given):
    """Refuse flags that cannot apply to what was asked for, rather than ignore them."""
    mode = mode_of(args)
    for name in sorted(given & set(MODES) - {mode}):
        raise UserError(f"{flag(name)} does not apply with {flag(mode)}")
    if mode == "evaluate" and not source_of(args):
        raise UserError(f"--evaluate scores a checkpoint, not {args.evaluate!r}; random weights "
                        "are scored by --location-probe random and --linear-probe random")
    if "model" in given and source_of(args):
        raise UserError(f"--model does not apply with {flag(mode)} CHECKPOINT: the encoder's "
                        f"shape comes from the checkpoint")

def check_applies(given, mode, dataset):
    """Refuse a typed flag that cannot apply to the mode or the dataset, rather than ignore it."""
    def named(k):
        return f"--dataset {k}" if k in DATASETS else "pre-training" if k == "pretrain" else flag(k)
    for name in sorted(given):
        for chosen, kinds in ((mode, ("pretrain", *MODES)), (dataset, tuple(DATASETS))):
            allowed = [k for k in kinds if k in (FLAGS[name].applies or ())]
            if allowed and chosen not in allowed:
                raise UserError(f"{flag(name)} applies only with "
                                f"{' or '.join(map(named, allowed))}")

def complete_args(args, given):
    """Fill the defaults that depend on other flags; a checkpoint decides the encoder."""
    if source_of(args):
        take_encoder_shape(args, given)
    if args.img_size is None:
        args.img_size = DATASETS[args.dataset]
        native = first_image_size(args)
        if native and native != (args.img_size, args.img_size):
            warn(f"the images in --data-dir are {native[0]}x{native[1]} px, but --{args.dataset} "
                 f"trains at {args.img_size} px unless told otherwise: pass --img-size "
                 f"{min(native)} to train at their size")
    if args.patch_size is None:
        args.patch_size = 4 if args.img_size == 32 else 16
    for name, value in recipe(args.recipe, mode_of(args)).items():
        if name in FLAGS and name not in given:  # a typed flag wins over the recipe
            setattr(args, name, value)
    if args.workers is None:
        args.workers = 8 if torch.cuda.is_available() and args.device != "cpu" else 0
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / default_run_name(args))

def first_image_size(args):
    """(width, height) of the first image of an ImageFolder --data-dir; None when there is none."""
    for path in sorted(Path(args.data_dir).glob("*/*")) if args.dataset == "imagefolder" else []:
        try:
            with Image.open(path) as im:
                return im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return None

def default_run_name(args):
    """A default folder of its own for each kind of run, source, recipe and seed."""
    mode, source = mode_of(args), source_of(args)
    if mode == "pretrain":
        name = f"{args.dataset}-pretrain"
    elif mode == "finetune" and not source:
        name = f"{args.dataset}-scratch"
    else:  # <run>-finetune, <run>-evaluate, <dataset>-random-location-probe, ...
        origin = Path(source).resolve().parent.name if source else f"{args.dataset}-random"
        name = f"{origin}-{mode.replace('_', '-')}"
    return (name + (f"-{args.recipe}" if args.recipe != "laptop" else "")
            + (f"-seed{args.seed}" if args.seed else ""))

# 7. Checkpoints from anywhere =====================================================================

def load_checkpoint(path):
    """torch.load under weights_only: no file runs code; MAE's pickled Namespace of args passes."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a folder, a truncated file, not a checkpoint, a class it refuses
        refused = re.search(r"unsupported global: GLOBAL \S+", str(e), re.IGNORECASE)
        why = (refused[0] if refused else getattr(e, "strerror", None)
               or "not a PyTorch checkpoint, or a truncated one")
        raise UserError(f"cannot read checkpoint {str(path)!r}: {why}") from None

class Imported(NamedTuple):
    model: dict         # our DropPos key names: encoder.*, maybe mask_pos_token and decoder.*
    source: str         # the layout, for messages
    args: dict | None   # train.py's run flags (its checkpoint.pt only)
    mode: str | None    # "pretrain" / "finetune" (train.py's checkpoint.pt only)
    epoch: int | None   # completed epochs, where the file says
    arch: dict          # what the file's arch name tells (arch_facts), {} without one
    extra: dict         # facts from MAE's Namespace of args

NAMESPACE_FACTS = ("mask_ratio", "pos_mask_ratio", "epochs")  # of MAE's args, the ones read
_ENCODER = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")  # timm's top-level names
_DECODER = {"decoder_embed": "decoder.embed", "decoder_blocks": "decoder.blocks",
            "decoder_norm": "decoder.norm", "decoder_pred": "decoder.head"}
# (dim, depth, heads) of the ViT sizes; tiny is DeiT's, the others are in both repos' models.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
          "large": (1024, 24, 16), "huge": (1280, 32, 16)}

def _rename(state):
    """timm / official DropPos key names -> ours; the rest (a pixel decoder, a head) is left out."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP's wrapper
    # decoder_pred is ours if it is the N-way position head; MAE's predicts 3p² pixels, no square N.
    pos, pred = state.get("pos_embed"), state.get("decoder_pred.weight")  # (1, 1+N, D), (?, Dd)
    rows = pred.shape[0] if pred is not None and pred.ndim == 2 else None
    positional = pos is not None and pos.ndim == 3 and rows == pos.shape[1] - 1
    ours = {"encoder": "encoder", "decoder": "decoder", "mask_pos_token": "mask_pos_token",
            **{k: "encoder." + k for k in _ENCODER}, **(_DECODER if positional else {})}
    tops = {key: key.split(".")[0] for key in state}
    return {ours[top] + key[len(top):]: state[key] for key, top in tops.items() if top in ours}

def import_state(obj, path):
    """What load_checkpoint returned -> Imported; UserError for a layout this cannot place."""
    ck = obj if isinstance(obj, dict) else {}  # anything else is refused below
    args = mode = epoch = name = None
    facts = {}
    if isinstance(ck.get("args"), dict) and ck.get("mode") in TASKS:
        source, state, args, mode = "train.py checkpoint", ck.get("model"), ck["args"], ck["mode"]
        epoch = ck.get("epoch")
    elif "state_dict" in ck:  # main_pretrain.py / main_finetune.py: epoch is already epoch + 1
        source, state, epoch = "official DropPos checkpoint", ck["state_dict"], ck.get("epoch")
        name = ck.get("model")
    elif isinstance(ck.get("args"), argparse.Namespace):  # save_model: its epoch is 0-based
        source, state, ns = "MAE/DropPos save_model", ck.get("model"), vars(ck["args"])
        name = ns.get("model")
        facts = {k: ns[k] for k in NAMESPACE_FACTS if ns.get(k) is not None}
        epoch = ck["epoch"] + 1 if isinstance(ck.get("epoch"), int) else None
    elif "model" in ck:  # MAE's released files: encoder only, or (visualize) with its decoder
        source, state = "MAE encoder", ck["model"]
    else:
        source, state = "timm encoder", ck
    tensors = (isinstance(state, dict) and all(map(torch.is_tensor, state.values()))
               and all(isinstance(k, str) for k in state))
    model = _rename(state) if tensors else {}
    if "encoder.patch_embed.proj.weight" not in model or "encoder.pos_embed" not in model:
        what = (f"a dict with keys {[str(k) for k in ck][:8]}{' ...' if len(ck) > 8 else ''}"
                if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise UserError(f"{str(path)!r} is not a checkpoint train.py can read: {what}; expected a "
                        "train.py checkpoint.pt or encoder.pt, an official DropPos or MAE "
                        "checkpoint, or a timm ViT state dict")
    if source == "timm encoder" and all(k.split(".")[0] in _ENCODER for k in state):
        source = "train.py encoder"  # exactly a ViT's keys: what train.py writes
    arch = arch_facts(name) if isinstance(name, str) else {}
    return Imported(model, source, args, mode, epoch, arch, facts)

def encoder_shape(model):
    """Sizes an Imported.model's tensors tell (heads: None); pos_embed "sincos" if MAE's fixed."""
    proj, pos = model["encoder.patch_embed.proj.weight"], model["encoder.pos_embed"]
    n = pos.shape[1] - 1 if pos.ndim == 3 else 0
    side = math.isqrt(max(n, 0))
    if proj.ndim != 4 or pos.ndim != 3 or pos.shape[2] != proj.shape[0] or side * side != n:
        raise UserError(f"pos_embed {tuple(pos.shape)} and patch embedding {tuple(proj.shape)} "
                        "are not (1, 1 + h·w, D) and (D, 3, p, p) of a square grid with [CLS]")
    dim, p = proj.shape[0], proj.shape[-1]  # (D, C, p, p)
    fixed = dim % 4 == 0 and torch.allclose(pos[0, 1:].float(), sincos_pos_embed(dim, (side, side)),
                                            rtol=0, atol=1e-5)
    depth = {part: len({k.split(".")[2] for k in model if k.startswith(f"{part}.blocks.")})
             for part in ("encoder", "decoder")}
    shape = dict(img_size=side * p, patch_size=p, dim=dim, depth=depth["encoder"], heads=None,
                 pos_embed="sincos" if fixed else "learnable")
    if {"decoder.head.weight", "decoder.embed.weight"} <= model.keys():  # a position decoder
        shape.update(decoder_dim=len(model["decoder.embed.weight"]), decoder_depth=depth["decoder"],
                     decoder_heads=None)
    return shape

def resize_pos_embed(pos, grid, kind):
    """pos (1, 1+s*s, D) -> (1, 1+h*w, D), [CLS] kept: sincos recomputed, learnable resized."""
    s, dim = math.isqrt(pos.shape[1] - 1), pos.shape[2]
    if tuple(grid) == (s, s):
        return pos
    if kind == "sincos":
        patches = sincos_pos_embed(dim, grid).to(pos)[None]
    else:  # bicubic on the (1, D, s, s) grid
        patches = F.interpolate(pos[0, 1:].T.reshape(1, dim, s, s).float(), grid, mode="bicubic")
        patches = patches.flatten(2).transpose(1, 2).to(pos.dtype)  # (1, h*w, D)
    return torch.cat([pos[:, :1], patches], dim=1)

def arch_facts(name):
    """Sizes an arch name such as "DropPos_mae_vit_base_patch16_dec512d2b" tells, else {}."""
    m = re.fullmatch(r"(DropPos_)?(mae_)?vit_(\w+?)_patch(\d+)(?:_dec(\d+)d(\d+)b)?", name)
    if not m or m[3] not in _SIZES:
        return {}
    facts = dict(zip(("dim", "depth", "heads"), _SIZES[m[3]]), name=name, patch_size=int(m[4]))
    if m[2]:  # a pre-training model; without a dec suffix it is the "recommended" dec512d8b alias
        facts.update(decoder_dim=int(m[5] or 512), decoder_depth=int(m[6] or 8), decoder_heads=16)
    return facts

@functools.lru_cache(maxsize=2)
def imported(path):
    """The checkpoint at path in our key names, read once (parse and build both need it)."""
    return import_state(load_checkpoint(path), path)

def take_encoder_shape(args, given):
    """The checkpoint's encoder shape into args; a typed flag it contradicts is refused."""
    path, mode = source_of(args), mode_of(args)
    imp = imported(path)
    try:
        tensors = encoder_shape(imp.model)
    except UserError as e:
        raise UserError(f"{path!r} is not a ViT: {e}") from None
    arch = imp.arch if imp.arch.get("dim") == tensors["dim"] else {}  # the name's heads fit
    shape = dict(tensors, heads=arch.get("heads"), decoder_heads=arch.get("decoder_heads"),
                 **imp.extra)
    if imp.args:  # the run's flags; the parser's defaults for flags the file predates
        config = model_config(build_parser().parse_args([], argparse.Namespace(**imp.args)))
        shape.update({k: v for k, v in config.items() if v is not None})
    if mode == "evaluate" and imp.args and "recipe" not in given:  # its evaluation crop
        args.recipe = imp.args.get("recipe", "laptop")
    keys = ENCODER_SHAPE
    if mode == "evaluate" and "decoder.head.weight" in imp.model:  # the whole DropPos, as trained
        keys += ("decoder_dim", "decoder_depth", "decoder_heads", "mask_ratio", "pos_mask_ratio")
        shape = {"mask_ratio": 0.75, "pos_mask_ratio": 0.75, **shape}
    resizable = {"img_size"} if mode in ("finetune", "location_probe", "linear_probe") else set()
    for key in keys:
        if key not in given:
            if shape.get(key) is None:  # heads of a file without run flags or arch name
                raise UserError(f"{path!r} does not record the number of {key.replace('_', ' ')}; "
                                f"pass {flag(key)} (a train.py checkpoint.pt records it)")
            setattr(args, key, shape[key])
        elif shape.get(key) not in (None, getattr(args, key)) and key not in resizable:
            raise UserError(f"{flag(key)} {getattr(args, key)} differs from the encoder in "
                            f"{path!r} ({shape[key]}): {mode.replace('_', ' ')} uses the encoder "
                            "as it was trained; drop the flag")

def source_line(args):
    """' from PATH (layout, epoch E of T)' for the start-up line; ' from random weights' etc."""
    path = source_of(args)
    if not path:
        return "" if mode_of(args) == "pretrain" else " from random weights"
    if args.resume:  # the run's own checkpoint holds the weights: the source may be gone
        return f" from {path}"
    imp = imported(path)
    total = (imp.args or imp.extra).get("epochs")
    epoch = "" if imp.epoch is None else f", epoch {imp.epoch}" + (f" of {total}" if total else "")
    return f" from {path} ({imp.source}{epoch})"

def build_encoder(args, drop_path=0.0):
    """The ViT of args' shape, with the mode's checkpoint's weights (not on --resume: its own)."""
    c = model_config(args)
    try:
        encoder = ViT(c["img_size"], c["patch_size"], 3, c["dim"], c["depth"], c["heads"],
                      c["pos_embed"], drop_path=drop_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if source_of(args) and not args.resume:
        load_encoder(encoder, args)
    return encoder

def build_classifier(args, num_classes):
    """The checkpoint's encoder (its shape is in args: `take_encoder_shape`), a fresh head."""
    return Classifier(build_encoder(args, args.drop_path), num_classes,
                      switch(args.recipe, "finetune", "mae_head"))

def load_encoder(encoder, args):
    """The checkpoint's encoder into `encoder`, its position embedding resized to its grid."""
    path = source_of(args)
    state = {k.removeprefix("encoder."): v for k, v in imported(path).model.items()
             if k.startswith("encoder.")}
    kind = "learnable" if encoder.pos_embed.requires_grad else "sincos"
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], encoder.grid, kind)
    load_state(encoder, state, f"the encoder in {path!r}")

# 8. The run folder: one live run, whole files, exact resume =======================================

def resumed_args(args, given):
    """The rule of --resume: the run goes on with the flags it was started with; a typed flag that
    would change it is refused by name; free ones (FREE_ON_RESUME) replace the saved ones."""
    path = Path(args.resume)
    if path.is_dir():
        path = path / "checkpoint.pt"
    folder = str(path.parent)
    saved = dict(vars(build_parser().parse_args([])), **load_training_checkpoint(path)["args"])
    check_applies(given, mode_of(argparse.Namespace(**saved)), saved["dataset"])
    for name in sorted(given - FREE_ON_RESUME):
        if getattr(args, name) != saved[name]:
            raise UserError(f"{flag(name)} would change the run in {folder!r}: it was started "
                            f"with {saved[name]!r}, you gave {getattr(args, name)!r}; drop the "
                            "flag, or start a new run in another --output-dir")
    if "output_dir" in given and Path(args.output_dir).resolve() != path.parent.resolve():
        raise UserError(f"--resume continues the run in its own folder {folder!r}; drop "
                        f"--output-dir")
    merged = argparse.Namespace(**saved)
    for name in given & FREE_ON_RESUME:
        setattr(merged, name, getattr(args, name))
    merged.output_dir, merged.resume = folder, str(path)
    return merged

CHECKPOINT_KEYS = ("mode", "args", "model", "optimizer", "epoch", "step_in_epoch", "ranks",
                   "n_train")

def load_training_checkpoint(path):
    ck = load_checkpoint(path)
    if not (isinstance(ck, dict) and all(k in ck for k in CHECKPOINT_KEYS)):
        raise UserError(f"checkpoint {str(path)!r} is not a training checkpoint of this version "
                        f"of train.py")
    return ck

def load_state(module, state, what):
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise UserError(f"{what} does not match this model: {detail}") from None

def atomic_write(path, write):
    """Write a file whole or not at all: a temporary beside it, fsync'ed, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # main() says it in one line, naming the file
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None

class FolderLock:
    """A live run owns its folder: rank 0 holds `.lock` with flock(2), which the kernel drops when
    the process dies however it dies. The file names the owner. A new run never overwrites a run."""

    def __init__(self, args):
        self.folder, self.args, self.fd = Path(args.output_dir), args, None

    def __enter__(self):
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 holds it for the run
            return self
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(f / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.__exit__()
            owner = (f / ".lock").read_text().strip() or "a process that is starting up"
            raise UserError(f"{str(f)!r} belongs to a live run ({owner}); let it finish or stop "
                            "it, or use another --output-dir") from None
        done = [n for n in ("checkpoint.pt", "evaluation.json") if (f / n).exists()]
        if done and not self.args.resume:
            self.__exit__()
            raise UserError(f"{str(f)!r} already holds a run ({done[0]}); continue a run with "
                            f"python train.py --resume {f}, or use another --output-dir")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}: {' '.join(sys.argv)}"[:200].encode())
        return self

    def __exit__(self, *_):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

def row_before(line, epochs_done, steps_done):
    """Whether a metrics.jsonl line is a whole row written before the checkpoint taken there."""
    try:
        row = json.loads(line)
        return row["epoch"] <= epochs_done if row.get("summary") else row["step"] <= steps_done
    except (ValueError, KeyError, TypeError, AttributeError):  # half a row, or not one
        return False

class RunFolder:
    """Everything exact resume needs, in one place: the objects a checkpoint restores, the position
    in the run, every process's RNG state and running sums, metrics.jsonl cut back to match."""

    def __init__(self, args, proc, task, optimizer, data):
        self.args, self.proc, self.task, self.data = args, proc, task, data
        self.objects = {"model": task.model, "optimizer": optimizer}
        self.folder = Path(args.output_dir)
        self.checkpoint = self.folder / "checkpoint.pt"
        self.epoch, self.step, self.sums, self.elapsed_before = 0, 0, None, 0.0
        if args.resume:
            self.restore(Path(args.resume))

    def restore(self, path):
        ck, here = load_training_checkpoint(path), str(self.folder)
        if len(ck["ranks"]) != self.proc.world:
            n = len(ck["ranks"])
            raise UserError(f"the run in {here!r} used {n} process(es); resume it with as many "
                            f"(torchrun --nproc_per_node={n})")
        if ck["n_train"] != len(self.data.train):
            raise UserError(f"the run in {here!r} trained on {ck['n_train']} images, but "
                            f"{len(self.data.train)} are there now; check --data-dir")
        for name, obj in self.objects.items():
            load_state(obj, ck.get(name, {}), f"the {name} state in checkpoint {str(path)!r}")
        self.epoch, self.step = ck["epoch"], ck["step_in_epoch"]
        self.elapsed_before = ck.get("elapsed_s", 0.0)  # absent from older versions
        mine = ck["ranks"][self.proc.rank]
        self.sums = mine["sums"]
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate((3, tuple(mine["rng"]["python"]), None))
        if mine["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
        if self.epoch < self.args.epochs:
            say(f"resumed {here!r} at epoch {self.epoch + 1} step {self.step} "
                f"({self.args.epochs} epochs in all)")

    def first_step(self, epoch):
        """Where `epoch` starts: a resumed epoch goes on where it stopped."""
        return self.step if epoch == self.epoch else 0

    def open_log(self, total_steps):
        """The run's Logger, its metrics.jsonl cut back to the rows the checkpoint saw."""
        path, steps = self.folder / "metrics.jsonl", self.data.stream.steps
        if self.proc.rank == 0:
            done = self.epoch * steps + self.step
            text = path.read_bytes() if path.exists() else b""
            kept = [row + b"\n" for row in text.splitlines() if row_before(row, self.epoch, done)]
            if b"".join(kept) != text:  # a half-written last row goes too
                atomic_write(path, lambda f: f.writelines(kept))
        self.log = Logger(path, self.proc, self.args.log_every, steps, total_steps, self.sums,
                          (self.task.acc_name, self.task.acc_key), self.elapsed_before)
        return self.log

    def save(self, epoch, step):
        """checkpoint.pt for (completed epochs, steps into the next); every process takes part."""
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        mine = {"rng": rng, "sums": list(self.log.epoch_sums)}
        ranks = [mine]
        if self.proc.world > 1:
            ranks = [None] * self.proc.world
            dist.all_gather_object(ranks, mine)
        failed = None
        if self.proc.rank == 0:
            self.log.sync()
            state = {name: obj.state_dict() for name, obj in self.objects.items()}
            state.update(mode=self.task.mode, args=dict(vars(self.args), resume=None),
                         n_train=len(self.data.train), epoch=epoch, step_in_epoch=step,
                         ranks=ranks, elapsed_s=self.log.elapsed(), precision=self.proc.precision)
            try:
                atomic_write(self.checkpoint, lambda f: torch.save(state, f))
            except OSError as e:
                failed = e
        if agree(failed is not None, self.proc):  # every process stops when the write failed
            raise failed or UserError(f"rank 0 could not write {str(self.checkpoint)!r}")

    def stop(self, why, epoch, step, signum):
        """The run stopped after `step` steps of `epoch` (from 0). Ctrl-C or SIGTERM: save, then
        die of that signal; a non-finite loss: stop without saving, naming the last good one."""
        if why == "interrupted":
            self.save(epoch, step)
            say(f"\ninterrupted: saved {self.checkpoint} in epoch {epoch + 1} after step "
                     f"{step}; continue with: python train.py --resume {self.folder}", err=True)
            raise SystemExit(128 + (signum or signal.SIGINT))
        last = (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint.exists()
                else "no checkpoint was written yet")
        raise UserError(f"the loss became non-finite in epoch {epoch + 1} at step {step}; stopped "
                        f"without saving ({last}). Lower --blr"
                        + (", or try --precision fp32" if self.proc.precision == "bf16" else ""))

# 9. Processes and devices: torchrun, precision, stopping together =================================

class Proc(NamedTuple):
    """This process: rank and world size under torchrun (0 and 1 alone), device, precision."""
    rank: int
    world: int
    local: int
    device: torch.device
    precision: str
    precision_why: str = "asked for"
    threads: str = ""  # on a CPU: how many, and why

def start_processes(args):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = 0, 0
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        rank = dist.get_rank()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Proc(rank, world, local, device, *pick_precision(args.precision, device),
                pick_threads() if device.type == "cpu" else "")

def pick_precision(name, device):
    """--precision auto, from the hardware, never a timing race: bf16 on a GPU that supports it and
    on a CPU with bf16 matmul units (~2x fp32; emulated elsewhere, ~100x slower). -> (it, why)."""
    if name != "auto":
        return name, "asked for"
    if device.type == "cuda":
        fast, why = torch.cuda.is_bf16_supported(), "the GPU's bf16 support"
    else:
        fast, why = (bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
                     "avx512_bf16/amx_bf16 in the CPU flags")
    return ("bf16" if fast else "fp32"), f"auto: {'' if fast else 'no '}{why}"

def pick_threads():
    """One thread per core that no other process keeps busy: beside one busy core, two threads
    ran 4x slower than one, each waiting at every operation for the one sharing a core. Also keeps
    freed memory for reuse. OMP_NUM_THREADS overrides the count.  -> what the start-up line says."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc: handing freed activations back to the OS and faulting
        libc.mallopt(-1, 1 << 30)  # them in again cost ~10 % of a CPU step; M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 25)  # and M_MMAP_THRESHOLD at its largest, 32 MB
    n = torch.get_num_threads()  # torch's default: one per core
    if "OMP_NUM_THREADS" in os.environ:
        return f"{n} thread{'s' * (n > 1)} (OMP_NUM_THREADS)"
    busy = busy_cores()
    torch.set_num_threads(max(1, n - busy))
    threads = torch.get_num_threads()
    return f"{threads} thread{'s' * (threads > 1)} ({busy} of {n} cores busy elsewhere)"

def busy_cores(seconds=0.3):
    """How many of this process's cores another process keeps over half busy (/proc/stat)."""
    def ticks():  # cpu -> (idle, total) since boot
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if re.match(r"cpu\d", line)]
        return {int(r[0][3:]): (int(r[4]) + int(r[5]), sum(map(int, r[1:]))) for r in rows}
    try:
        before = ticks()
        time.sleep(seconds)
        after = ticks()
    except OSError:
        return 0
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else after
    return sum(1 for c in mine if c in before and after[c][1] > before[c][1]
               and (after[c][0] - before[c][0]) / (after[c][1] - before[c][1]) < 0.5)

def cpu_flags():
    """The CPU's feature flags as Linux reports them (empty elsewhere: fp32 is the safe default)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split())
                         for line in f if line.startswith("flags")), set())
    except OSError:
        return set()

def wrap_model(model, args, proc):
    """The module the loop calls: compiled on request, under DistributedDataParallel (torchrun)."""
    if args.compile:
        model = torch.compile(model)
    if proc.world > 1:
        ids = [proc.local] if proc.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model

def autocast(proc):
    return torch.autocast(proc.device.type, torch.bfloat16, enabled=proc.precision == "bf16")

def agree(flag, proc):
    """Whether any process raised `flag`: one tiny all_reduce, so all of them decide alike."""
    if proc.world == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0

class StopRequest:
    """Ctrl-C and SIGTERM set a flag: a run stops between two steps; a second one quits at once."""

    def __enter__(self):
        self.signalled = 0  # the signal's number once one came
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def on_signal(self, signum, _):
        if self.signalled:
            print("\ninterrupted twice: quit without saving", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signalled = signum

    def agreed(self, loss, proc):
        """'non-finite', 'interrupted' or None, the same on every process after the same step."""
        bad = ~torch.isfinite(loss.detach())
        sig = torch.tensor(float(bool(self.signalled)), device=loss.device)
        status = torch.stack([bad.float(), sig])
        if proc.world > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        bad, sig = status.tolist()
        return "non-finite" if bad else "interrupted" if sig else None

# 10. Images: downloads, photos, synthetic ones, augmentation; warnings ==========================

class SyntheticImages(Dataset):
    """Offline images: vertical and horizontal colour ramps, so positions are learnable, and
    stripes whose frequency and orientation give 10 classes; each image jittered by its seed."""

    num_classes = 10

    def __init__(self, n, size, seed=0):
        self.n, self.size, self.seed = n, size, seed
        self.targets = [i % self.num_classes for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(mix_seed(self.seed, i))
        label, s = self.targets[i], self.size
        y, x = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        tint = torch.rand(3, 1, 1, generator=g) * 0.3
        img = torch.stack([0.3 + 0.5 * x, 0.8 - 0.6 * y, 0.9 - 0.5 * y]) * 0.7 + tint
        freq = (label % 5 + 1) * math.pi * 2
        phase = torch.rand(1, generator=g).item() * 2 * math.pi
        stripes = torch.sin(freq * (y if label < 5 else x) + phase)
        img = img + 0.2 * stripes + 0.05 * torch.randn(3, s, s, generator=g)
        return v2.functional.to_pil_image(img.clamp(0, 1)), label

def load_imagefolder(args):
    """--data-dir and, if given, --val-dir as ImageFolders."""
    def folder(path, option):
        if not Path(path).is_dir():
            raise UserError(f"{option} folder {str(path)!r} does not exist")
        try:
            loader = functools.partial(open_image, size=args.img_size)
            return torchvision.datasets.ImageFolder(str(path), loader=loader)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{option} folder {str(path)!r} holds no images in class sub-folders "
                            f"({e})") from None

    train = folder(args.data_dir, "--data-dir")
    return train, folder(args.val_dir, "--val-dir") if args.val_dir else None

def open_image(path, size):
    """ImageFolder's loader: the image as RGB, or a blank stand-in, named, if it is unreadable."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        warn(f"unreadable image {path}: a blank stand-in takes its place")
        return Image.new("RGB", (size, size), tuple(round(255 * m) for m in MEAN))  # 0 normalised

_said = set()  # warnings said so far: each once

def warn(line):
    """A warning, said where it arises: the run goes on, but the user should know."""
    if line not in _said:
        _said.add(line)
        say(f"warning: {line}", err=True)

def say(line, err=False):
    """A line from rank 0 on stdout (or stderr), written at once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)

def say_start(what, data, proc, details):
    """The line every mode says before its work: what, on which data, where, how."""
    say(f"{what} on {data.args.dataset}: {data.describe()}; {proc.world} process(es) on "
        f"{proc.device}, {proc.precision} ({proc.precision_why}), {proc.threads or 'CUDA'}; "
        f"{details}")

class SeededTransform(Dataset):
    """Augmentation seeded by (seed, epoch, index), so a crop depends on neither the workers nor
    where a resumed epoch starts; in a forked CPU generator: the global streams stay untouched."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, self.epoch, i))
            return self.transform(img), label

def train_transform(size, finetune=False, mae_augment=False):
    """PIL image -> normalised (3, size, size): RandomResizedCrop, flip; mae_augment: MAE's too."""
    crop = [v2.RandomResizedCrop(size, scale=crop_scale(finetune), antialias=True,
                                 interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip()]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if not mae_augment:
        return v2.Compose([v2.ToImage(), *crop, *to_float])
    # value "random": per-pixel N(0, 1), timm's mode 'pixel'
    erase = v2.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")
    return v2.Compose([*crop, NoisyRandAugment(), v2.ToImage(), *to_float, erase])

class NoisyRandAugment(nn.Module):
    """timm's RandAugment 'rand-m9-mstd0.5-inc1' (MAE's --aa): levels drawn from N(9, 0.5)."""

    num_ops, magnitude, magnitude_std, op_prob = 2, 9.0, 0.5, 0.5

    def __init__(self):
        super().__init__()
        self.pil_op = v2.RandAugment(num_ops=1, num_magnitude_bins=101,  # bin k: level k/10
                                     fill=[round(255 * m) for m in MEAN],
                                     interpolation=v2.InterpolationMode.BICUBIC)

    def sample_bin(self):
        level = (self.magnitude + self.magnitude_std * torch.randn(())).clamp(0, 10)
        return int(torch.round(level * 10))

    def forward(self, img):  # a PIL image: torchvision has no bicubic for tensors here
        for _ in range(self.num_ops):
            if torch.rand(()) < self.op_prob:
                self.pil_op.magnitude = self.sample_bin()
                img = self.pil_op(img)
        return img

def eval_crop_pct(args):
    """Share of the resized image evaluation keeps: all (laptop), or MAE's 224/256 (paper)."""
    return switch(args.recipe, mode_of(args), "eval_crop") if args.img_size <= 224 else 1.0

def eval_transform(size, crop_pct=1.0):
    """Resize the shorter side to int(size / crop_pct) (bicubic), centre-crop to size, normalise."""
    resize = v2.Resize(int(size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC,
                       antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

def decode_in_memory(dataset, size, limit_bytes=2 ** 31):
    """Small images as uint8 (M, 3, size, size) and labels (M,); None if not size×size, over 64 px
    or over 2 GiB in all: those are cropped one by one."""
    if size > 64 or len(dataset) * 3 * size * size > limit_bytes:
        return None
    images = torch.empty(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in range(len(dataset)):
        img, labels[i] = dataset[i]
        if img.size != (size, size):
            return None
        images[i] = v2.functional.pil_to_tensor(img)
    return images, labels

def load_cifar(args):
    """CIFAR-10/100 from --data-dir, downloaded there if absent."""
    cls = getattr(torchvision.datasets, args.dataset.upper())  # CIFAR10 or CIFAR100
    photos = Path(args.data_dir).glob("*/*")  # class folders of images: not a place for CIFAR
    if any(p.suffix.lower() in torchvision.datasets.folder.IMG_EXTENSIONS for p in photos):
        raise UserError(f"--data-dir {args.data_dir!r} holds class folders of images; did you "
                        "mean --dataset imagefolder?")
    try:
        return tuple(cls(args.data_dir, train=t, download=True) for t in (True, False))
    except Exception as e:  # network, disk or archive: all end the same way for the user
        why = (str(e).splitlines() or [""])[0]
        raise UserError(f"could not get {args.dataset} into {args.data_dir!r} ({type(e).__name__}: "
                        f"{why}). Download {cls.filename} from https://www.cs.toronto.edu/~kriz/"
                        f"cifar.html and put it in {args.data_dir!r} (or pass --data-dir), or use "
                        "--dataset synthetic, which works offline") from None

def warn_about_split_names(dataset, data_dir):
    """Class folders named like splits: --data-dir is almost certainly one level too high."""
    names = {n.lower() for n in getattr(dataset, "classes", [])}
    splits = sorted(names & {"train", "training", "test", "val", "valid", "validation"})
    if splits:
        warn(f"the class folders of --data-dir are named like splits ({', '.join(splits)}): "
             f"--data-dir should be the training split itself, e.g. --data-dir "
             f"{Path(data_dir) / splits[-1]}")

# 11. --evaluate ===================================================================================

def evaluate(args):
    """--evaluate: score a checkpoint, training nothing: the position head's scores and picture,
    a classifier's test top-1, k-NN top-1, each beside its chance; evaluation.json, a JSON line."""
    proc = start_processes(args)
    data = Data(args, proc)
    torch.manual_seed(args.seed)  # the masks the scores and the picture use
    path, folder = args.evaluate, Path(args.output_dir)
    imp = imported(path)
    results = {"checkpoint": path, "source": imp.source, "epoch": imp.epoch}
    head = "decoder.head.weight" in imp.model
    if head:  # the whole DropPos, position head included
        model = build_droppos(model_config(args)).to(proc.device).eval()
        load_state(model, imp.model, f"the model in {path!r}")
        encoder = model.encoder
    elif imp.mode == "finetune":  # train.py's classifier
        mae_head = switch(imp.args.get("recipe", "laptop"), "finetune", "mae_head")
        model = Classifier(build_encoder(args), data.num_classes, mae_head)
        load_state(model, load_checkpoint(path)["model"], f"the classifier in {path!r}")
        encoder = model.to(proc.device).encoder
    else:
        encoder = build_encoder(args).to(proc.device)
    say_start(f"evaluation of {path} ({imp.source})", data, proc, f"folder {folder}")
    if head:
        scores, beliefs = head_positions(model, data, args, proc)
        chance = chance_of_grid(model.grid, "test_pos")
        results.update(scores, **{f"{k}_chance": v for k, v in chance.items()},
                       mask_ratio=args.mask_ratio, pos_mask_ratio=args.pos_mask_ratio)
    elif imp.mode == "finetune":
        results["test_top1"] = evaluate_classifier(model, data, args, proc)
    results.update(knn_top1=run_knn(encoder, data, args, proc), top1_chance=100 / data.num_classes)
    if head and proc.rank == 0:
        save_reassembly(model, picture_images(data), folder / "reassembly.png", proc,
                        beliefs["test_pos"])
    if proc.rank == 0:
        line = json.dumps(results)
        atomic_write(folder / "evaluation.json", lambda f: f.write(line.encode() + b"\n"))
        print(line, flush=True)

# 12. Pictures: reassembly.png, the head's beliefs, curves.png =====================================

GIVEN, CORRECT, CLASH = (0, 200, 0), (255, 200, 0), (230, 0, 0)  # cell borders in reassembly.png
LEGEND = ("green: position given  ·  yellow: patch in its true cell  ·  "
          "red k: k patches sent to one cell, the surest shown  ·  grey: no patch")
FONT, SMALL = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
CELL, PAD = 16, 8  # px per cell of maps A and B, px margin
ORIGIN = (PAD, 68)  # top left of map A; map B starts (h + 2) * CELL to its right
TRUE, ARGMAX, EMPTY = (0, 220, 255), (0, 200, 0), 200 / 255  # cyan, green, grey: no data
SKIP = {"epoch", "step", "summary", "elapsed_s", "images_per_sec"}

def picture_images(data):
    """8 held-out images for reassembly.png, spread over the set (and so over its classes)."""
    tf, n = eval_transform(data.args.img_size, eval_crop_pct(data.args)), len(data.held_out)
    return torch.stack([tf(data.held_out[i][0]) for i in range(0, n, max(n // 8, 1))][:8])

def denormalize(imgs):
    """Inverse of `normalize`, clamped to [0, 1] for display."""
    mean, std = (torch.tensor(v, device=imgs.device).view(3, 1, 1) for v in (MEAN, STD))
    return (imgs * std + mean).clamp(0, 1)

def save_reassembly(model, imgs, path, proc, beliefs=None):
    """reassembly.png: 8 held-out images as the model puts them back, the head's beliefs below.
    A seeded mask in a forked RNG: every epoch shows the same patches; resume stays exact."""
    was_training, devices = model.training, [proc.device] if proc.device.type == "cuda" else []
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices), autocast(proc):
        torch.manual_seed(0)
        imgs = imgs.to(proc.device)
        out = model(imgs, 0.0)
        B, N = len(imgs), model.encoder.num_patches
        everywhere = torch.arange(N, device=proc.device).expand(B, N)  # weights (B, N) sum to 1
        weights = droppos.attentive_weights(model.encoder, imgs, everywhere, model.tau)
    model.train(was_training)
    rows, info = reassembly_rows(denormalize(imgs.float()), out.ids_keep, out.dropped,
                                 out.logits.float().softmax(-1), weights.float(), model.grid,
                                 model.encoder.patch_size)
    labels = ["original", f"visible ({round(100 * model.n_vis / N)}%)", "predicted", "attention"]
    caption = (f"these {B} images: position top-1 on their dropped patches "
               f"{100 * out.acc.item():.1f}% (chance {100 / N:.1f}%)  ·  attention: each patch's "
               f"weight in the loss, hot = high\n{LEGEND}")
    picture = draw_reassembly(rows, info, max(1, math.ceil(128 / imgs.shape[-1])), labels, caption)
    if beliefs is not None and len(beliefs[1]):  # below: what the head predicts on the held-out set
        pic, below = picture, draw_beliefs(*beliefs, model.grid)
        size = (max(pic.width, below.width), pic.height + below.height)
        picture = Image.new("RGB", size, "white")
        picture.paste(pic)
        picture.paste(below, (0, pic.height))
    atomic_write(path, lambda f: picture.save(f, format="PNG"))

def reassembly_rows(pixels, ids_keep, dropped, probs, weights, grid, patch_size):
    """The picture's rows as images (B, 3, H, W) in [0, 1], and the cells the drawing marks.
    pixels (B, 3, H, W) in [0, 1]; ids_keep, dropped (B, n); probs (B, n, N); weights (B, N)."""
    patches = patchify(pixels, patch_size)  # (B, N, p·p·3)
    vis = droppos.gather_tokens(patches, ids_keep)  # (B, n, p·p·3)
    cells = torch.arange(probs.shape[-1], device=probs.device)
    conf, pred = probs.max(-1)  # (B, n)
    claims = pred[..., None] == cells  # (B, n, N)
    count = claims.sum(1)  # (B, N)
    # scatter with repeated indices keeps an arbitrary writer; on a collision we want the surest one
    winner = torch.where(claims, conf[..., None], -1.0).argmax(1)  # (B, N)
    surest = droppos.gather_tokens(vis, winner)  # (B, N, p·p·3): the patch each cell shows
    shown = torch.zeros_like(count, dtype=torch.bool).scatter(1, ids_keep, True)  # (B, N)
    hot = heat(weights / weights.amax(1, keepdim=True))  # (B, N, 3), the hottest patch white
    lum = patchify(pixels.mean(1, keepdim=True).expand_as(pixels), patch_size)  # colour = heat
    rows = dict(original=patches,
                visible=torch.where(shown[..., None], patches, 0.5),
                predicted=torch.where(count[..., None] > 0, surest, 0.5),
                attention=0.3 * lum + 0.7 * repeat(hot, "b n c -> b n (pp c)", pp=patch_size ** 2))
    info = dict(patch_size=patch_size,
                kept=shown.scatter(1, ids_keep, ~dropped),  # (B, N), False where dropped
                correct=(ids_keep.gather(1, winner) == cells) & (count > 0),  # (B, N)
                collisions=[[(c, k) for c, k in enumerate(ks) if k > 1] for ks in count.tolist()])
    return {k: unpatchify(v, patch_size, grid).clamp(0, 1) for k, v in rows.items()}, info

def draw_reassembly(rows, info, scale, labels, caption):
    """Enlarge the rows (nearest neighbour), label them at the left, mark cells, caption on top."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=10)
    B, _, H, W = next(iter(rows.values())).shape
    c, w, gap = info["patch_size"] * scale, W // info["patch_size"], 6  # c: cell side in px
    dx, dy, top = W * scale + gap, H * scale + gap, gap + 20 * (caption.count("\n") + 1)
    label_w = max(font.getbbox(s)[2] for s in labels) + 2 * gap
    text_w = max(font.getbbox(s)[2] for s in caption.split("\n")) + 2 * gap
    canvas = Image.new("RGB", (max(label_w + B * dx, text_w), top + len(rows) * dy), "white")
    draw = ImageDraw.Draw(canvas)
    big = torch.cat(list(rows.values())).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    big = torchvision.utils.make_grid(big.float(), B, gap, pad_value=1)  # white padding all round,
    canvas.paste(to_pil(big.permute(1, 2, 0)), (label_w - gap, top - gap))  # so it goes first
    draw.multiline_text((gap, gap), caption, fill="black", font=font, spacing=5)  # 20 px a line
    y0 = {name: top + r * dy for r, name in enumerate(rows)}
    for y, label in zip(y0.values(), labels):
        draw.text((gap, y + H * scale // 2), label, fill="black", font=font, anchor="lm")
    marks = [("visible", b, k, GIVEN, 0) for b, k in info["kept"].nonzero().tolist()]  # 0: no tab
    marks += [("predicted", b, k, CORRECT, 0) for b, k in info["correct"].nonzero().tolist()]
    marks += [("predicted", b, k, CLASH, n)
              for b, clashes in enumerate(info["collisions"]) for k, n in clashes]
    for name, b, k, colour, n in (m for m in marks if m[0] in y0):  # borders inside their cell
        x, y = label_w + b * dx + k % w * c, y0[name] + k // w * c
        draw.rectangle([x, y, x + c - 1, y + c - 1], outline=colour, width=max(1, c // 8))
        if n:  # the count on a red tab in the corner; a wider label would hide the patch
            box = draw.textbbox((x + 1, y + 1), str(n), font=small, anchor="lt")
            draw.rectangle([x, y, box[2] + 1, box[3] + 1], fill=CLASH)
            draw.text((x + 1, y + 1), str(n), fill="white", font=small, anchor="lt")
    return canvas

def heat(t):
    """(...) in [0, 1] -> (..., 3) floats: black -> red -> yellow -> white."""
    return torch.stack([3 * t, 3 * t - 1, 3 * t - 2], -1).clamp(0, 1)

def to_pil(rgb, cell=1):
    """(H, W, 3) floats in [0, 1] -> PIL image, each pixel enlarged to a `cell` px square."""
    img = Image.fromarray(rgb.mul(255).round().byte().cpu().numpy())
    return img.resize((img.width * cell, img.height * cell), Image.NEAREST)

def row_col_beliefs(probs, true_pos, grid):
    """(h, h) and (w, w): [i, j] is the mean mass put on row (column) j by the patches whose true
    row (column) is i. Rows sum to 1; a row no patch has is NaN. probs: (M, N), true_pos: (M,)."""
    h, w = grid
    p = probs.float().view(-1, h, w)
    out = []
    for true, mass, n in ((true_pos // w, p.sum(2), h), (true_pos % w, p.sum(1), w)):
        total = mass.new_zeros(n, n).index_add_(0, true, mass)  # (n, n) mass per true line
        out.append(total / torch.bincount(true, minlength=n)[:, None])  # 0 / 0 = NaN: no patches
    return tuple(out)

def draw_beliefs(probs, true_pos, grid, examples=4):
    """probs (M, N), true_pos (M,), grid (h, w) -> RGB image. A, B: true x predicted row, column
    (row_col_beliefs), on one scale; C: `examples` patches over the grid, each on its own."""
    h, w = grid
    rows, cols = row_col_beliefs(probs, true_pos, grid)
    s = position_scores(probs, true_pos, grid)
    img = Image.new("RGB", (4000, 2000), "white")  # ample; cropped to what is drawn
    d = ImageDraw.Draw(img)
    d.multiline_text((PAD, PAD), spacing=6, fill="black", font=FONT, text=(
        f"held-out images, {len(probs)} dropped patches, {h}x{w} grid. A, B: mean mass per "
        f"predicted row / column (across) by true one (down). C: patches, cyan = true cell, "
        f"green = argmax\n"
        f"top-1 {s['top1']:.1%} (chance {s['chance_top1']:.1%})   within one cell "
        f"{s['within1']:.1%} (chance {s['chance_within1']:.1%})   mean distance "
        f"{s['distance']:.2f} cells (chance {s['chance_distance']:.2f})"))
    x, y = ORIGIN
    vmax = max(rows.nan_to_num(0).max().item(), cols.nan_to_num(0).max().item())
    for m, title in ((rows, "A rows"), (cols, "B columns")):  # framed: white cells show
        d.text((x, y - 4), title, "black", FONT, anchor="ld")
        img.paste(to_pil(heat(m / vmax).nan_to_num(EMPTY), CELL), (x, y))  # NaN: no data
        d.rectangle([x - 1, y - 1, x + len(m) * CELL, y + len(m) * CELL], outline="grey")
        x += (len(m) + 2) * CELL
    bars = [(x, y, max(h, w) * CELL, vmax, {f"1/{h}": 1 / h, f"1/{w}": 1 / w})]  # h = w: 1 mark
    idx = torch.linspace(0, len(probs) - 1, min(examples, len(probs))).round().long().unique()
    c, x, y, vmax = CELL // 2, PAD, y + (max(h, w) + 3) * CELL, probs[idx].max().item()
    d.text((x, y - 4), "C patches", "black", FONT, anchor="ld")
    for k in idx.tolist():
        img.paste(to_pil(heat(probs[k].view(h, w) / vmax), c), (x, y))
        d.rectangle([x - 1, y - 1, x + w * c, y + h * c], outline="grey")
        t, a = true_pos[k].item(), probs[k].argmax().item()
        tx, ty, ax, ay = x + t % w * c, y + t // w * c, x + a % w * c, y + a // w * c
        d.rectangle([tx, ty, tx + c - 1, ty + c - 1], outline=TRUE, width=2)
        d.rectangle([ax + 2, ay + 2, ax + c - 3, ay + c - 3], fill=ARGMAX)  # inside an outline
        x += w * c + 2 * PAD
    bars.append((x, y, h * c, vmax, {"1/N": 1 / (h * w)}))
    for x, y, n, vmax, marks in bars:  # colour scales, n px tall: 0 at the bottom, chance ticked
        img.paste(to_pil(heat(torch.linspace(1, 0, n)[:, None].expand(-1, 12))), (x, y))
        d.text((x, y - 2), f"{vmax:.3g}", "black", SMALL, anchor="ld")
        d.text((x, y + n + 2), "0", "black", SMALL, anchor="lt")
        ty = [y + round((1 - v / vmax) * (n - 1)) for v in marks.values()]
        for t in ty:
            d.line([x - 3, t, x + 15, t], fill=TRUE, width=2)
        d.text((x + 18, sum(ty) / len(ty)), ", ".join(f"{k} = {v:.3g}" for k, v in marks.items()),
               "black", SMALL, anchor="lm")  # one label: 1/h and 1/w may be close
    box = ImageChops.invert(img).getbbox()  # the drawn part: not white
    return img.crop((0, 0, box[2] + PAD, box[3] + PAD))

def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def draw_curves(rows, spe=1, chance=None, columns=3):
    """metrics.jsonl rows -> RGB image: a panel per numeric key over epochs (a progress row at
    step / spe, steps per epoch), NaN or missing skipped, chance (key -> value) a grey line."""
    pw, ph = 280, 160  # px per panel
    summ = [r for r in rows if r.get("summary") and finite(r.get("epoch"))]
    prog = [r for r in rows if not r.get("summary") and finite(r.get("epoch"))
            and finite(r.get("step"))]
    at_x = [[(r["step"] / spe, r) for r in prog], [(r["epoch"], r) for r in summ]]
    keys = dict.fromkeys(k for r in prog + summ for k, v in r.items()
                         if k not in SKIP and finite(v))
    lines = {k: [sorted((x, r[k]) for x, r in xr if finite(r.get(k))) for xr in at_x] for k in keys}
    chance = chance or {}
    xmax = max((x for thin, thick in lines.values() for x, _ in thin + thick), default=1) or 1
    caption = (f"x: epochs, progress rows at step / {spe:g}.  Thin line: progress rows, dots: "
               "epoch summaries, grey: chance" if keys else f"{len(rows)} rows, nothing to draw")
    img = Image.new("RGB", (max(min(columns, len(keys)) * pw, round(FONT.getlength(caption)))
                            + 2 * PAD, 28 + math.ceil(len(keys) / columns) * ph), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), caption, "black", FONT)
    for i, (k, (thin, thick)) in enumerate(lines.items()):
        x0, y0 = PAD + i % columns * pw, 28 + i // columns * ph
        px0, py0, px1, py1 = x0 + 48, y0 + 18, x0 + pw - 12, y0 + ph - 22
        ys = [y for _, y in thin + thick] + ([chance[k]] if k in chance else [])
        lo, hi = min(ys), max(ys)
        a, b = (lo, hi) if hi > lo else (lo - 1, hi + 1)  # a flat line sits mid-panel

        def at(x, y):  # data -> px, 4 px inside the frame
            return px0 + x / xmax * (px1 - px0), py1 - 4 - (y - a) / (b - a) * (py1 - py0 - 8)
        d.text((x0 + 4, y0 + 2), k, "black", SMALL)
        d.rectangle([px0, py0, px1, py1], outline="grey")
        for v in torch.linspace(a, b, 5).tolist():  # ticks: the ends and three between
            d.line([px0 - 3, at(0, v)[1], px0, at(0, v)[1]], fill="grey")
            d.text((px0 - 5, at(0, v)[1]), f"{v:.3g}", "black", SMALL, anchor="rm")
        d.text(((px0 + px1) / 2, py1 + 4), f"epoch 0 to {xmax:g}", "black", SMALL, anchor="mt")
        if k in chance:
            d.line([px0, at(0, chance[k])[1], px1, at(0, chance[k])[1]], fill="grey")
            d.text((px1 - 3, at(0, chance[k])[1] - 2), "chance", "grey", SMALL, anchor="rd")
        series = (thin, (90, 120, 200), 1, 2 * (len(thin) == 1)), (thick, (210, 70, 0), 2, 3)
        for pts, colour, width, r in series:  # progress rows, summaries
            pts = [at(*p) for p in pts]
            d.line(pts, fill=colour, width=width)  # PIL draws no line through a single point
            for x, y in pts:  # dots: summaries and a lone progress row
                d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return img

# 13. Logging ======================================================================================

def hms(s):  # 0:01:40
    return str(datetime.timedelta(seconds=int(s)))

class Logger:
    """Progress lines on stdout, one JSON object per line in metrics.jsonl (rank 0). Epochs count
    from 1, `step` optimiser steps over the run; accuracies in percent."""

    def __init__(self, path, proc, every_s, steps_per_epoch, total_steps, epoch_sums, acc_names,
                 elapsed_before):
        self.path, self.proc, self.every_s, self.file = path, proc, every_s, None
        self.acc_name, self.acc_key = acc_names  # on the console, in metrics.jsonl
        self.epochs, self.steps_per_epoch = total_steps // steps_per_epoch, steps_per_epoch
        self.total_steps = total_steps
        self.sums = [0.0, 0.0, 0]  # loss, accuracy, steps since the last line
        self.epoch_sums = list(epoch_sums or [0.0, 0.0, 0])  # the same since the epoch began
        self.t_start = self.t_last = time.time()
        self.elapsed_before = elapsed_before  # earlier sittings of this run, up to its checkpoint
        self.imgs_since, self.clock = 0, None

    def step(self, epoch, step, loss, acc, n_imgs, lr, extra):
        """Count one step (epoch from 0, step from 1 within it); write a line when one is due."""
        loss, acc = float(loss.detach()), float(acc)  # `acc` never needs a gradient
        for sums in (self.sums, self.epoch_sums):
            sums[0], sums[1], sums[2] = sums[0] + loss, sums[1] + acc, sums[2] + 1
        self.imgs_since += n_imgs * self.proc.world
        now, done = time.time(), epoch * self.steps_per_epoch + step
        if self.clock is None:  # a sitting's first step warms up (and compiles): time the rest
            self.clock = (now, done)
        if now - self.t_last < self.every_s and step != self.steps_per_epoch:
            return
        # This process's share only: the processes log at different steps, so no collective here.
        loss_mean, acc_mean = self.sums[0] / self.sums[2], self.sums[1] / self.sums[2]
        ips = self.imgs_since / max(now - self.t_last, 1e-9)
        per_step = (now - self.clock[0]) / max(done - self.clock[1], 1)
        fields = "".join(f"{'σ' if k == 'sigma' else k} {v:.3f}  " for k, v in extra.items())
        self.write({"epoch": epoch + 1, "step": done, "loss": loss_mean,
                    self.acc_key: 100 * acc_mean, "lr": lr, **extra, "images_per_sec": ips},
                   f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.steps_per_epoch}  "
                   f"loss {loss_mean:.4f}  {self.acc_name} {100 * acc_mean:.2f}%  lr {lr:.2e}  "
                   f"{fields}{ips:.0f} img/s  left {hms((self.total_steps - done) * per_step)}")
        self.sums, self.t_last, self.imgs_since = [0.0, 0.0, 0], now, 0

    def epoch_summary(self, epochs_done, results):
        sums = self.epoch_sums
        if self.proc.world > 1:  # every process's steps
            t = torch.tensor(sums, dtype=torch.float64, device=self.proc.device)
            dist.all_reduce(t)
            sums = t.tolist()
        loss_mean, acc_mean = sums[0] / max(sums[2], 1), sums[1] / max(sums[2], 1)
        self.epoch_sums = [0.0, 0.0, 0]
        elapsed = self.elapsed()
        extra = "".join(f"  {k} {v:.2f}{'' if k.endswith('distance') else '%'}"
                        for k, v in results.items())
        self.write({"epoch": epochs_done, "summary": True, "loss": loss_mean,
                    self.acc_key: 100 * acc_mean, **results, "elapsed_s": elapsed},
                   f"== epoch {epochs_done}/{self.epochs} done  loss {loss_mean:.4f}  "
                   f"{self.acc_name} {100 * acc_mean:.2f}%{extra}  elapsed {hms(elapsed)}")

    def draw_curves(self, chance):
        """curves.png from metrics.jsonl: a run's learning curves, redrawn after every epoch."""
        if self.proc.rank == 0:
            self.sync()
            rows = [json.loads(line) for line in self.path.read_text().splitlines()]
            picture = draw_curves(rows, self.steps_per_epoch, chance)
            atomic_write(self.path.with_name("curves.png"), lambda f: picture.save(f, format="PNG"))

    def elapsed(self):
        """Wall seconds of the run's kept work, summed over every sitting (resume continues it)."""
        return self.elapsed_before + time.time() - self.t_start

    def write(self, record, line):
        if self.proc.rank != 0:
            return
        if self.file is None:  # made with its first row
            self.file = open(self.path, "a")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print(line, flush=True)

    def sync(self):
        """metrics.jsonl on disk before the checkpoint that follows its rows."""
        if self.file is not None:
            os.fsync(self.file.fileno())

# 14. Benchmark ====================================================================================

def clock(device):
    """time.perf_counter() once the device has done the work queued so far: what timing needs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

def matmul_flops(device, dtype):
    """Measured FLOP/s of large square matmuls: the peak a training step can hope for."""
    n, per_call, max_n = 128, 0.0, 8192 if device.type == "cuda" else 2048
    while per_call < 0.02 and n < max_n:  # grow the size until one product takes 20 ms to time
        n *= 2
        a, b = torch.randn(2, n, n, device=device, dtype=dtype)
        a @ b  # warm-up: the first product of a size sets up its kernel
        t = clock(device)
        a @ b
        per_call = clock(device) - t
    reps = max(1, int(0.3 / max(per_call, 1e-6)))  # about 0.3 s of products
    t = clock(device)
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (clock(device) - t)

def droppos_flops(cfg):
    """Model FLOPs of one pre-training image (matmuls): per token 2·in·out a linear layer, 4·n·D
    attention, so a block on n tokens costs n·(24·D² + 4·n·D). Backward is twice the forward of
    what gets gradients; the attentive pass is one forward of all N patches."""
    D, Dd, N = cfg["dim"], cfg["decoder_dim"], (cfg["img_size"] // cfg["patch_size"]) ** 2
    n = int(N * (1 - cfg["mask_ratio"])) + 1  # + [CLS]
    patch_in = 3 * cfg["patch_size"] ** 2
    block = lambda tokens, d: tokens * (24 * d * d + 4 * tokens * d)
    encoder = cfg["depth"] * block(n, D) + 2 * (n - 1) * patch_in * D
    decoder = 2 * n * D * Dd + cfg["decoder_depth"] * block(n, Dd) + 2 * (n - 1) * Dd * N
    attentive = cfg["depth"] * block(N + 1, D) + 2 * N * patch_in * D
    return 3 * (encoder + decoder) + (attentive if cfg["attentive"] else 0)

def benchmark(args):
    """Time training steps after warm-up on one batch, then fed by the data stream."""
    proc = start_processes(args)
    device = proc.device
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    model = build_droppos(cfg).to(device)
    groups = param_groups(model, args.weight_decay, no_decay=no_decay_rule(args.recipe, "pretrain"))
    optimizer = make_optimizer(groups, (0.9, 0.95), device)
    net = wrap_model(model, args, proc)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    sigma = sigma_at(args.sigma, 0.5, decay=not args.no_sigma_decay)  # half-way through a run

    def step(x):
        with autocast(proc):
            loss = net(x, sigma).loss
        optimizer_step(model, optimizer, loss, args.clip_grad,
                       switch(args.recipe, "pretrain", "clip_each"))

    if device.type == "cpu":  # Linux keeps the high-water mark of resident memory; reset it here
        Path("/proc/self/clear_refs").write_text("5")
        rss_before_mb = resident_mb("VmRSS")
    for _ in range(BENCH_WARMUP):
        step(imgs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(BENCH_STEPS):
        t = clock(device)
        step(imgs)
        times.append(clock(device) - t)
    step_s = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # growth of peak resident memory over the model, inputs and libraries: activations,
        # gradients and optimiser state. From before warm-up: freed activations stay resident.
        peak_mb = resident_mb("VmHWM") - rss_before_mb
    ips, gflops = args.batch_size / step_s, droppos_flops(cfg) / 1e9
    peaks = {p: matmul_flops(device, torch.float32 if p == "fp32" else torch.bfloat16) / 1e9
             for p in ("fp32", "bf16")}
    result = dict(device=str(device), precision=proc.precision, batch_size=args.batch_size,
                  model={k: cfg[k] for k in ("img_size", "patch_size", *PRESETS[args.model])},
                  images_per_sec=round(ips, 1), step_ms=round(1000 * step_s, 1),
                  peak_memory_mb=round(peak_mb, 1), gflops_per_image=round(gflops, 3),
                  achieved_gflops=round(ips * gflops, 1), peak_gflops_fp32=round(peaks["fp32"], 1),
                  peak_gflops_bf16=round(peaks["bf16"], 1),
                  utilization=round(ips * gflops / max(peaks.values()), 3),  # the device's best
                  threads=torch.get_num_threads())
    try:
        result["images_per_sec_with_data"] = bench_with_data(args, step, proc)
    except UserError as e:
        result["images_per_sec_with_data"], result["data_error"] = None, str(e)
    print(json.dumps(result), flush=True)

def resident_mb(key):
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, in MB."""
    line = next(r for r in Path("/proc/self/status").read_text().splitlines() if r.startswith(key))
    return int(line.split()[1]) / 1024

def bench_with_data(args, step, proc):
    """Images/s of the same step fed by the training stream; None if it is too short to time."""
    n, t = 0, None
    for i, (imgs, _) in Data(args, proc).stream.epoch(0):
        if i == BENCH_WARMUP + BENCH_STEPS:
            break
        if i == BENCH_WARMUP:
            t = clock(proc.device)
        step(imgs)
        n += 0 if t is None else len(imgs)
    return round(n / (clock(proc.device) - t), 1) if n else None

# 15. The command, start to end ====================================================================

CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST,
                errno.ENOTDIR)  # a full or read-only disk, a file where a folder should be

def main(argv=None):
    """Train, evaluate or benchmark. Bad input, or a full or read-only disk: one line, exit 2."""
    _said.clear()  # each command names its warnings anew
    try:
        args = parse_args(argv)
        if args.benchmark:
            return benchmark(args)
        with FolderLock(args):  # one live run per folder
            (evaluate if args.evaluate else train)(args)
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in CANNOT_WRITE:
            raise
        if isinstance(e, OSError):
            e = (f"cannot write {e.filename or 'the output'}: {e.strerror}; a checkpoint written "
                 "before, if any, is intact")
        sys.stderr.write(f"error: {e}\n")  # one write: torchrun's processes' lines stay whole
        sys.stderr.flush()
        raise SystemExit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        # Stopped by Ctrl-C or SIGTERM, checkpoint saved: die of that signal, so a shell loop stops
        if e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            signal.signal(e.code - 128, signal.SIG_DFL)
            os.kill(os.getpid(), e.code - 128)
        raise
