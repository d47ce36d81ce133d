"""The PyTorch reference for knlp's LeNet-5 benchmark: the same model, data,
batch size, optimizer and schedule as scripts/lenet5.rhai, timed the same way
(two epochs of training with a test evaluation after each).
  .venv/bin/python benchmarks/lenet5_torch.py [--epochs 2] [--threads N]"""
import argparse, gzip, json, math, struct, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--threads", type=int, default=0)
p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)

def idx(path):
    data = gzip.open(path).read()
    magic, = struct.unpack(">I", data[:4])
    dims = [struct.unpack(">I", data[4 + 4 * i:8 + 4 * i])[0] for i in range(magic & 0xFF)]
    return torch.frombuffer(bytearray(data[4 + 4 * len(dims):]), dtype=torch.uint8).reshape(dims)

def images(split):
    x = idx(f"{a.root}/{split}-images-idx3-ubyte.gz").unsqueeze(1)
    y = idx(f"{a.root}/{split}-labels-idx1-ubyte.gz").long()
    x = F.interpolate(x, size=32, mode="bilinear", antialias=True, align_corners=False)
    return x, y

t_load = time.time()
xtr, ytr = images("train")
xte, yte = images("t10k")
xf = xtr.float() / 255
mean, std = xf.mean().item(), xf.std().item()
norm = lambda x: (x.float() / 255 - mean) / std
load_s = time.time() - t_load

class LeNet5(nn.Module):
    def __init__(s):
        super().__init__()
        s.layer1 = nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2, 2))
        s.layer2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2, 2))
        s.fc, s.fc1, s.fc2 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)
    def forward(s, x):
        x = s.layer2(s.layer1(x)).flatten(1)
        return s.fc2(F.relu(s.fc1(F.relu(s.fc(x)))))

m = LeNet5()
decay = [q for q in m.parameters() if q.dim() >= 2]
rest = [q for q in m.parameters() if q.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}], lr=a.lr, fused=True)
steps_per_epoch = math.ceil(len(ytr) / a.batch)
total = steps_per_epoch * a.epochs
g = torch.Generator().manual_seed(0)
step = 0
t0 = time.time()
for epoch in range(a.epochs):
    m.train()
    perm = torch.randperm(len(ytr), generator=g)
    for i in range(steps_per_epoch):
        idxs = perm[i * a.batch:(i + 1) * a.batch]
        x, y = norm(xtr[idxs]), ytr[idxs]
        for group in opt.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * a.lr
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    m.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 1000):
            correct += (m(norm(xte[i:i + 1000])).argmax(1) == yte[i:i + 1000]).sum().item()
train_s = time.time() - t0
print(json.dumps(dict(what="lenet5_cpu", impl="pytorch", torch=torch.__version__, threads=torch.get_num_threads(),
                      epochs=a.epochs, batch=a.batch, steps=step, seconds=round(train_s, 2),
                      seconds_per_epoch=round(train_s / a.epochs, 2), test_accuracy=round(correct / len(yte), 4),
                      load_s=round(load_s, 2))), flush=True)
