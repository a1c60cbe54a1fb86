"""A GLIGEN module for the tiny base that knows where things are, built by hand for the placement tests.

The tiny model has random weights, so it has no sense of place: its features at a spatial position say almost
nothing about where that position is, and no GLIGEN layer on top of it can put a phrase "there" (a real GLIGEN
learns that from photos). This fixture gives the test a sense of place and a GLIGEN module that uses it:

1. a coordinate T2I-Adapter (exact, set by hand): it adds each cell's (x, y) to the UNet's down-block features,
   so positions can be read from the features of later blocks;
2. a GLIGEN module whose only open gate is the fuser of `up_blocks.3.attentions.0`, solved in closed form:
   - its queries read a cell's position (a least-squares read-out of the features, centred on the image);
   - its object keys say which half-plane the box covers (left, right, top or bottom half: the four boxes the
     position net is fitted on, plus the null object, whose key shuts attention off);
   - keys and values sit in the feature directions where the visual tokens have almost no energy, so cells
     attend to the object only inside its half, and only the object carries a value;
   - the position net's last layer is a least-squares fit from its (random) hidden features to those keys.

Everything else is the tiny GLIGEN model. Our pipeline then has to deliver the boxes right (x0, y0, x1, y1, the
conditional rows, the scheduled steps) for the change to land in the box: a transposed or misplaced box moves it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

BLOCK = "up_blocks.3.attentions.0.transformer_blocks.0"
HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
          "bottom": (0.0, 0.5, 1.0, 1.0)}
SIZE = 128  # pixels: a 16 x 16 latent, so the block above works on 16 x 16 cells
ADAPTER_WEIGHT = 5.0


def coordinate_adapter():
    """A T2I-Adapter whose features are each cell's mean red (x) and green (y) and nothing else."""
    from diffusers import T2IAdapter

    ad = T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8,
                    adapter_type="full_adapter")
    with torch.no_grad():
        for p in ad.parameters():
            p.zero_()  # zero residual branches: every resnet is the identity
        w = ad.adapter.conv_in.weight  # (32, 3 * 64, 3, 3): unshuffled channel = colour * 64 + sub-pixel
        w[0, 0:64, 1, 1] = 1 / 64
        w[1, 64:128, 1, 1] = 1 / 64
        ad.adapter.body[2].in_conv.weight[0, 0, 0, 0] = 1
        ad.adapter.body[2].in_conv.weight[1, 1, 0, 0] = 1
    return ad.eval()


def coordinate_image(size: int = SIZE):
    from PIL import Image

    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    return Image.fromarray(img)


def _image_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _gligen_kwargs(position_net_dim: int, rows: int, boxes=None, phrase=None):
    b = torch.zeros(rows, 30, 4)
    m = torch.zeros(rows, 30)
    e = torch.zeros(rows, 30, position_net_dim)
    if boxes is not None:
        b[:, 0] = boxes
        m[:, 0] = 1
        e[:, 0] = phrase
    return {"gligen": {"boxes": b, "masks": m, "positive_embeddings": e}}


def build(comps, out: Path, phrases: list[str]) -> dict:
    """Write the coordinate adapter, its image and the placing GLIGEN module under `out`; returns their paths."""
    from sdstudio.formats.gligen import save_module
    from sdstudio.models.tiny import add_gligen

    out.mkdir(parents=True, exist_ok=True)
    g = add_gligen(comps.unet).float()
    ad = coordinate_adapter()
    ad.save_pretrained(out / "coords-adapter")
    coordinate_image().save(out / "coords.png")
    feats = [f * ADAPTER_WEIGHT for f in ad(_image_tensor(coordinate_image()))]
    blocks = {n: m for n, m in g.named_modules() if getattr(m, "fuser", None) is not None}
    with torch.no_grad():
        for b in blocks.values():  # every gate shut ...
            b.fuser.alpha_attn.zero_()
            b.fuser.alpha_dense.zero_()
    fuser = blocks[BLOCK].fuser
    dim = fuser.linear.out_features
    key_dim = g.position_net.positive_len

    # 1. What the fuser sees: its input features over noise levels and seeds (gates shut, so nothing changes).
    seen = []
    hook = fuser.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        for t in (980, 800, 600, 400, 200, 50):
            x = torch.randn(4, 4, SIZE // 8, SIZE // 8, generator=gen)
            g(x, t, encoder_hidden_states=ctx.expand(4, -1, -1),
              down_intrablock_additional_residuals=[f.expand(4, -1, -1, -1).clone() for f in feats],
              cross_attention_kwargs=_gligen_kwargs(key_dim, 4))
    hook.remove()
    z = torch.nn.functional.layer_norm(torch.cat(seen), (dim,)).double()  # (n, cells, dim): what norm1 makes
    n, cells, _ = z.shape
    side = int(math.isqrt(cells))
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side - 0.5
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    pos = torch.stack([px.flatten(), py.flatten()], 1).repeat(n, 1)  # centred cell positions
    flat = z.reshape(-1, dim)

    # 2. Directions where the visual tokens are nearly silent (LayerNorm leaves the all-ones direction empty)
    ones = torch.ones(dim, dtype=torch.float64) / math.sqrt(dim)
    evals, evecs = torch.linalg.eigh(flat.T @ flat / len(flat))
    quiet = [evecs[:, k] for k in range(dim) if abs(float(evecs[:, k] @ ones)) < 0.5][:4]
    e_x, e_y, e_c, e_v = quiet

    # 3. Queries: [x, y, 1, 0] read from the features (norm1 adds the constant through its bias).
    read = torch.linalg.lstsq(flat, pos).solution  # (dim, 2)
    read = read - ones[:, None] * (ones @ read)[None]
    beta = 6.0
    with torch.no_grad():
        fuser.norm1.weight.fill_(1.0)
        fuser.norm1.bias.fill_(1.0)
        for lin in (fuser.attn.to_q, fuser.attn.to_k, fuser.attn.to_v):
            lin.weight.zero_()
        q = fuser.attn.to_q.weight
        q[0] = (beta * read[:, 0]).float()
        q[1] = (beta * read[:, 1]).float()
        q[2] = beta / dim  # the mean of (LayerNorm + 1) is 1
        # 4. Keys and the value: read only the quiet directions.
        k = fuser.attn.to_k.weight
        k[0], k[1], k[2] = e_x.float(), e_y.float(), e_c.float()
        fuser.attn.to_v.weight[0] = e_v.float()
        out_w = torch.zeros_like(fuser.attn.to_out[0].weight)
        direction = torch.randn(dim, generator=torch.Generator().manual_seed(1))
        out_w[:, 0] = direction / direction.norm() * 8.0
        fuser.attn.to_out[0].weight.copy_(out_w)
        fuser.attn.to_out[0].bias.zero_()
        fuser.linear.weight.copy_(torch.eye(dim, key_dim))
        fuser.linear.bias.zero_()
        fuser.alpha_attn.fill_(3.0)

    # 5. The position net's last layer: each half box -> its half-plane key and a value; the null object -> a key
    #    that shuts attention off. Fitted over the test's phrases and a few random ones, so the phrase does not matter.
    def target(box):
        cx, cy = (box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5
        norm = math.hypot(cx, cy)
        nx, ny = cx / norm, cy / norm
        return 2.0 * (nx * e_x + ny * e_y) + 0.6 * e_v  # logit ~ beta * (n . p) / 2: positive on the box's side

    null = -3.0 * e_c
    pooled = _pooled(comps, phrases)
    extra = torch.randn(4, key_dim, generator=torch.Generator().manual_seed(2)) * pooled.std()
    xs, ys = [], []
    pn = g.position_net
    with torch.no_grad():
        for emb in torch.cat([pooled, extra]):
            for box in HALVES.values():
                xs.append(_hidden(pn, torch.tensor([box]), emb[None], torch.ones(1)))
                ys.append(target(box))
        xs.append(_hidden(pn, torch.zeros(1, 4), torch.zeros(1, key_dim), torch.zeros(1)))
        ys.append(null)
        h = torch.cat(xs).double()
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        y = torch.stack(ys)
        sol = torch.linalg.solve(h1.T @ h1 + 1e-6 * torch.eye(h1.shape[1], dtype=h.dtype), h1.T @ y)
        pn.linears[4].weight.copy_(sol[:-1].T.float())
        pn.linears[4].bias.copy_(sol[-1].float())
    module = save_module(g, out / "placing-gligen.safetensors")
    return {"module": module, "adapter": out / "coords-adapter", "image": out / "coords.png"}


def _hidden(pn, boxes, emb, mask):
    """The position net's features before its last layer, for one object."""
    from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox

    m = mask[:, None, None]
    xyxy = get_fourier_embeds_from_boundingbox(pn.fourier_embedder_dim, boxes[:, None])
    xyxy = xyxy * m + (1 - m) * pn.null_position_feature.view(1, 1, -1)
    pos = emb[:, None] * m + (1 - m) * pn.null_positive_feature.view(1, 1, -1)
    x = torch.cat([pos, xyxy], -1)
    for layer in list(pn.linears)[:-1]:
        x = layer(x)
    return x[:, 0]


def _pooled(comps, phrases):
    tok, te = comps.tokenizer, comps.text_encoder
    with torch.no_grad():
        ids = tok(phrases, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids).pooler_output.float()
