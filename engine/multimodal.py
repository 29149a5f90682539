"""Vision-language support: image inputs, the vision encoder inside the step, M-RoPE positions.

The engine treats an image as a run of placeholder tokens in the prompt (already expanded to the
right count). For such a request this module precomputes the model's multimodal rotary positions
(3 x prompt_len, plus the delta that carries through decode) and runs the model's own vision tower
to get one embedding row per placeholder, which the runner scatters into the packed input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class MultiModalInput:
    """Images of one request, preprocessed by the model's image processor."""

    pixel_values: torch.Tensor  # [sum of patches, patch_dim]
    image_grid_thw: torch.Tensor  # [num_images, 3]
    image_hashes: list[str] = field(default_factory=list)
    positions: torch.Tensor | None = None  # [3, prompt_len] M-RoPE positions of the prompt
    rope_delta: int = 0  # decode position p maps to p + rope_delta on every axis
    embeds: torch.Tensor | None = None  # [num_placeholders, hidden], computed once
    extra: dict = field(default_factory=dict)  # family specifics (e.g. deepstack features)

    @property
    def salt(self) -> bytes:
        """Prefix-cache salt: two different images never share KV blocks."""
        return hashlib.blake2b("|".join(self.image_hashes).encode(), digest_size=16).digest()


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_vision_language(hf_config) -> bool:
    return getattr(hf_config, "vision_config", None) is not None


class VisionAdapter:
    """Wraps a transformers Qwen-VL model: rope index, vision tower, embedding merge."""

    def __init__(self, model, hf_config):
        self.model = model
        self.inner = model.model
        self.config = hf_config
        self.image_token_id = hf_config.image_token_id
        self.merge = hf_config.vision_config.spatial_merge_size

    def num_placeholders(self, grid_thw: torch.Tensor) -> list[int]:
        return (grid_thw.prod(-1) // self.merge ** 2).tolist()

    @torch.inference_mode()
    def prepare(self, prompt_ids: list[int], mm: MultiModalInput) -> None:
        """Compute M-RoPE positions; check placeholders match the images."""
        ids = torch.tensor([prompt_ids])
        n_ph = int((ids == self.image_token_id).sum())
        want = sum(self.num_placeholders(mm.image_grid_thw))
        if n_ph != want:
            raise ValueError(f"prompt has {n_ph} image placeholder tokens but the images need {want}")
        types = (ids == self.image_token_id).int()
        pos, delta = self.inner.get_rope_index(ids, mm_token_type_ids=types,
                                               image_grid_thw=mm.image_grid_thw)
        mm.positions = pos[:, 0, :].to(torch.long)
        mm.rope_delta = int(delta.reshape(-1)[0])
        # cum[i]: placeholders before position i, to find a chunk's rows of the image embeddings.
        mm.extra["cum"] = [0] + torch.cumsum(types[0], 0).tolist()

    @torch.inference_mode()
    def encode(self, items: list[MultiModalInput], device, dtype) -> None:
        """Run the vision tower once over the images of several requests (batched)."""
        if not items:
            return
        pixels = torch.cat([m.pixel_values for m in items]).to(device)
        grids = torch.cat([m.image_grid_thw for m in items]).to(device)
        out = self.inner.get_image_features(pixel_values=pixels, image_grid_thw=grids)
        feats = out.pooler_output
        per_image = list(feats) if isinstance(feats, (tuple, list)) else [feats]
        # Qwen3-VL also returns features of early vision layers ("deepstack"), which its language
        # model adds to the hidden states of image tokens in its first layers.
        deep = getattr(out, "deepstack_features", None)
        i = 0
        for m in items:
            n = len(m.image_grid_thw)
            m.embeds = torch.cat(per_image[i:i + n]).to(dtype)
            if deep:
                m.extra["deepstack"] = [torch.cat(list(layer)[i:i + n]).to(dtype) for layer in deep]
            i += n

    def positions(self, seq_mm: MultiModalInput | None, start: int, end: int, prompt_len: int,
                  device) -> torch.Tensor:
        """[3, end - start] positions for tokens start..end of a sequence."""
        if seq_mm is None or seq_mm.positions is None:
            p = torch.arange(start, end, device=device)
            return p.unsqueeze(0).expand(3, -1)
        parts = []
        if start < prompt_len:
            parts.append(seq_mm.positions[:, start:min(end, prompt_len)].to(device))
        if end > prompt_len:
            gen = torch.arange(max(start, prompt_len), end, device=device) + seq_mm.rope_delta
            parts.append(gen.unsqueeze(0).expand(3, -1))
        return torch.cat(parts, dim=1)


class ImagePreprocessor:
    """The model's own PIL image processor (``AutoImageProcessor`` with the PIL backend: there is
    no torchvision here, and ``AutoProcessor`` would silently return only the tokenizer)."""

    def __init__(self, model_path: str, hf_config):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path, backend="pil")
        self.image_token_id = hf_config.image_token_id
        self.merge = hf_config.vision_config.spatial_merge_size

    def __call__(self, images: list, raw: list[bytes]) -> MultiModalInput:
        """PIL images (and their encoded bytes, for hashing) -> a request's multimodal input."""
        out = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return MultiModalInput(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                               image_hashes=[image_hash(b) for b in raw])

    def expand(self, prompt_ids: list[int], mm: MultiModalInput) -> list[int]:
        """Replace the i-th image placeholder token by as many copies as image i has patches."""
        counts = (mm.image_grid_thw.prod(-1) // self.merge ** 2).tolist()
        n_ph = prompt_ids.count(self.image_token_id)
        if n_ph != len(counts):
            raise ValueError(f"the prompt has {n_ph} image placeholders for {len(counts)} images")
        out, k = [], 0
        for t in prompt_ids:
            if t == self.image_token_id:
                out += [t] * counts[k]
                k += 1
            else:
                out.append(t)
        return out
