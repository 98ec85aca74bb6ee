"""DINO_REPO=path/to/dino python dino_reference.py --epochs 8   (from the adclr repository root, adclr installed)

Run facebookresearch/dino's own train_one_epoch / DINOLoss / DINOHead / ViT on CPU, on adclr's built-in
data and augmentation, at adclr's builtin-preset scale. Kept with its results as the record of how they were made; DINO's code itself is not copied here."""
import argparse, json, math, os, sys
sys.path.insert(0, os.environ["DINO_REPO"])  # a checkout of facebookresearch/dino, read-only
import torch, torch.distributed as dist, torch.nn as nn
torch.Tensor.cuda = lambda self, *a, **k: self  # DINO moves images with .cuda()
torch.cuda.synchronize = lambda *a, **k: None
import utils, vision_transformer as vits
utils.SmoothedValue.synchronize_between_processes = lambda self: None  # single process, CPU
from main_dino import DINOLoss, train_one_epoch
from adclr.augment import MultiCropAugmentation, MultiCropConfig
from adclr import data as D

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=16); p.add_argument("--lr", type=float, default=0.004)
p.add_argument("--min_lr", type=float, default=2.5e-4); p.add_argument("--bs", type=int, default=32)
p.add_argument("--out_dim", type=int, default=256); p.add_argument("--hidden", type=int, default=512)
p.add_argument("--bottleneck", type=int, default=32); p.add_argument("--teacher_temp", type=float, default=0.04)
p.add_argument("--momentum", type=float, default=0.996); p.add_argument("--local", type=int, default=2)
p.add_argument("--size", type=int, default=32); p.add_argument("--local_size", type=int, default=16)
p.add_argument("--wd_end", type=float, default=0.04); p.add_argument("--norm_last_layer", type=int, default=1)
p.add_argument("--n", type=int, default=1600)
a = p.parse_args()
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
aug = MultiCropAugmentation(MultiCropConfig(global_size=a.size, local_size=a.local_size, local_crops_number=a.local,
                                            num_query=0, patch_size=8))
class Crops:
    def __call__(self, img):
        return aug(img)["crops"]
ds = D.SyntheticScenes(a.n, a.size, "train", 0, Crops())  # the recorded run: D.SyntheticShapes at commit 699407d
loader = torch.utils.data.DataLoader(ds, batch_size=a.bs, shuffle=True, drop_last=True, num_workers=1,
                                     collate_fn=lambda b: ([torch.stack(c) for c in zip(*(x for x, _ in b))], None))
def vit():
    return vits.VisionTransformer(img_size=[a.size], patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4,
                                  qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
student = utils.MultiCropWrapper(vit(), vits.DINOHead(96, a.out_dim, False, bool(a.norm_last_layer), hidden_dim=a.hidden, bottleneck_dim=a.bottleneck))
teacher = utils.MultiCropWrapper(vit(), vits.DINOHead(96, a.out_dim, False, True, hidden_dim=a.hidden, bottleneck_dim=a.bottleneck))
teacher.load_state_dict(student.state_dict())
for q in teacher.parameters(): q.requires_grad = False
class DDPLike(nn.Module):
    def __init__(s, m): super().__init__(); s.module = m
    def forward(s, x): return s.module(x)
student = DDPLike(student)
loss = DINOLoss(a.out_dim, a.local + 2, 0.04, a.teacher_temp, 0, a.epochs)
opt = torch.optim.AdamW(utils.get_params_groups(student))
lr_s = utils.cosine_scheduler(a.lr * a.bs / 256, a.min_lr, a.epochs, len(loader), warmup_epochs=1)
wd_s = utils.cosine_scheduler(0.04, a.wd_end, a.epochs, len(loader))
m_s = utils.cosine_scheduler(a.momentum, 1, a.epochs, len(loader))
args = argparse.Namespace(epochs=a.epochs, clip_grad=3.0, freeze_last_layer=1)
for epoch in range(a.epochs):
    stats = train_one_epoch(student, teacher, teacher, loss, loader, opt, lr_s, wd_s, m_s, epoch, None, args)
    with torch.no_grad():  # teacher entropy on one batch
        imgs, _ = next(iter(loader))
        t = teacher(imgs[:2]); pr = torch.softmax((t - loss.center) / a.teacher_temp, -1)
        H = -(torch.special.xlogy(pr, pr)).sum(-1).mean().item(); pm = pr.mean(0); Hm = -(torch.special.xlogy(pm, pm)).sum().item()
    print("EPOCH", json.dumps({"epoch": epoch + 1, "loss": stats["loss"], "H": H, "H_batch": Hm, "lnK": math.log(a.out_dim)}), flush=True)
