"""
mrsp.py -- MR-SP infrastructure (Multi-modal Reinforcement Sequence Parallelism, LongVILA-R1).

Today this file holds the foundation every stage uses: torchrun set-up, the tiny Qwen2.5-VL
checkpoint builder, and model + processor loading from a local HF checkpoint directory (tiny or a
real Qwen2-VL / Qwen2.5-VL). Parallel video encoding, the embedding cache, the sequence-parallel
prefill and the rollout engines land here next (see the issue tracker).

Write the tiny checkpoint (tokenizer trained on the dataset text + Qwen special tokens):
    python mrsp.py --init_tiny=out/tiny --data=data/synth
Run one video forward per sample (a smoke test of the whole input path), single process:
    python mrsp.py --model=out/tiny --data=data/synth/val.jsonl --num_frames=32
Same, data-parallel on N processes (CPU gloo or CUDA nccl):
    torchrun --standalone --nproc_per_node=2 mrsp.py --model=out/tiny --data=data/synth/val.jsonl
A real checkpoint works the same way:
    torchrun --standalone --nproc_per_node=8 mrsp.py --model=/ckpt/Qwen2.5-VL-7B-Instruct --data=... --dtype=bfloat16
"""
import glob
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from data import (CATEGORIES, INSTRUCTION, apply_overrides, config_of, encode_sample, collate_sft,
                  format_target, load_records, load_video)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Qwen2.5-VL's chat template (system default, <|vision_start|><|video_pad|><|vision_end|> per video).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The tiny model (DESIGN.md §3): ~1M params, a video forward in tens of ms on one CPU core.
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6]))
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[1], tokens_per_second=2)
TINY_PIXELS = 56 * 56  # every frame resized to 56x56 -> 4 video tokens per 2 frames


# -----------------------------------------------------------------------------
# distributed set-up from torchrun's environment
def setup_dist():
    """-> (rank, local_rank, world_size, device). World size 1 runs without torchrun or a process group."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# tiny checkpoint
def _dataset_texts(data_dir):
    """Every string a prompt or target can contain, to train the tiny tokenizer on."""
    texts = [INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))) if os.path.isdir(data_dir) else [data_dir]
    if not files:
        raise FileNotFoundError(f"--data={data_dir}: no *.jsonl files to train the tokenizer on")
    for f in files:
        for r in load_records(f):
            texts += [r["question"], "\n".join(r["options"]), format_target(r)]
    return texts


def train_tokenizer(texts, vocab_size=1024):
    """A byte-level BPE in Qwen2's tokenizer class: any text encodes (bytes fall back), specials kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          errors="replace", clean_up_tokenization_spaces=False)


def init_tiny(out_dir, data_dir, seed=0, vocab_size=1024):
    """Write a random-init Qwen2_5_VLForConditionalGeneration + processor as a standard HF checkpoint."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor, GenerationConfig)
    tokenizer = train_tokenizer(_dataset_texts(data_dir), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS),
        video_processor=Qwen2VLVideoProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS,
                                              cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    vocab = (len(tokenizer) + 63) // 64 * 64  # pad the embedding table, as real checkpoints do
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], **TINY_TEXT),
        vision_config=TINY_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               bos_token_id=ids["<|endoftext|>"])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    return n


# -----------------------------------------------------------------------------
# loading a local checkpoint (tiny or real)
def load_model(path, dtype="float32", device="cpu", attn_implementation="sdpa"):
    """-> (model, processor) from a local HF Qwen2-VL / Qwen2.5-VL checkpoint directory."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model={path}: expected a local HF checkpoint directory with config.json "
                                f"(build the tiny one with: python mrsp.py --init_tiny={path} --data=data/synth)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--model={path}: model_type {config.model_type!r} is not supported; "
                         f"expected one of {SUPPORTED_MODEL_TYPES}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype={dtype!r}: expected float32, bfloat16 or float16")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation).to(device)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def model_inputs(batch, device):
    """The tensors of a data.py batch that the HF forward takes. mm_token_type_ids must be passed:
    without it Qwen2.5-VL silently falls back to 1-D positions (DESIGN.md §10)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


# -----------------------------------------------------------------------------
# process groups: a 2-D (dp, sp) mesh. SP ranks share one sequence; DP ranks see different data.
def setup_mesh(sp=1):
    """-> SimpleNamespace(mesh, dp_group, sp_group, dp_rank, dp_size, sp_rank, sp_size).
    World size 1 (no torchrun) gives groups of None and sizes 1; every helper here accepts that."""
    from types import SimpleNamespace
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(sp, int) or sp < 1 or world % sp:
        raise ValueError(f"--sp={sp} must be a positive divisor of the world size {world} "
                         f"(torchrun --nproc_per_node x nodes); e.g. --sp=1 or --sp={world}")
    if world == 1:
        return SimpleNamespace(mesh=None, dp_group=None, sp_group=None, dp_rank=0, dp_size=1, sp_rank=0, sp_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    return SimpleNamespace(mesh=mesh, dp_group=mesh.get_group("dp"), sp_group=mesh.get_group("sp"),
                           dp_rank=mesh.get_local_rank("dp"), dp_size=world // sp,
                           sp_rank=mesh.get_local_rank("sp"), sp_size=sp)


def _group_info(group):
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# -----------------------------------------------------------------------------
# parallel video encoding (MR-SP step 1): temporal patches split over the SP ranks
def _split_even(n, parts):
    """Contiguous [start, end) bounds of n items over `parts` ranks, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return bounds


def encode_videos(model, pixel_values_videos, video_grid_thw, group=None):
    """Vision tower over a batch of videos with the work split across the ranks of `group`.

    The unit of work is one temporal patch (2 frames) of one video: Qwen2.5-VL's vision tower attends
    within a temporal patch and its rotary depends on (h, w) only, so encoding contiguous runs of
    patches separately and concatenating is exact (DESIGN.md §3). Each rank encodes a contiguous,
    equal share of all the videos' patches, then the merged embeddings are all-gathered.
    -> (sum_i t_i*h_i*w_i / merge^2, D) on every rank, identical to one-rank encoding.
    Differentiable (autograd all-gather) when the vision tower is trainable."""
    rank, P = _group_info(group)
    inner = model.model if hasattr(model, "model") else model
    merge2 = inner.visual.spatial_merge_size ** 2
    grid = video_grid_thw.tolist()
    rows = [h * w for _, h, w in grid]                      # pixel rows per temporal patch
    offsets = [0]
    for (t, h, w) in grid:
        offsets.append(offsets[-1] + t * h * w)
    units = [(i, t) for i, (T, _, _) in enumerate(grid) for t in range(T)]
    bounds = _split_even(len(units), P)

    def plan(r):  # the runs (video, t0, t1) that rank r encodes
        runs = []
        for i, t in units[bounds[r]:bounds[r + 1]]:
            if runs and runs[-1][0] == i:
                runs[-1][2] = t + 1
            else:
                runs.append([i, t, t + 1])
        return runs

    runs = plan(rank)
    D = inner.config.vision_config.out_hidden_size
    if runs:
        pix = torch.cat([pixel_values_videos[offsets[i] + t0 * rows[i]: offsets[i] + t1 * rows[i]] for i, t0, t1 in runs])
        sub_grid = torch.tensor([[t1 - t0, grid[i][1], grid[i][2]] for i, t0, t1 in runs])
        local = torch.cat(inner.get_video_features(pix, sub_grid).pooler_output)     # (n_local, D)
    else:  # more ranks than temporal patches: this rank idles
        local = pixel_values_videos.new_zeros(0, D, dtype=inner.visual.dtype)
    if P == 1:
        return local
    counts = [sum((t1 - t0) * rows[i] // merge2 for i, t0, t1 in plan(r)) for r in range(P)]
    assert counts[rank] == local.shape[0]
    pad = local.new_zeros(max(counts) - local.shape[0], local.shape[1])
    padded = torch.cat([local, pad])                         # gloo/nccl all_gather needs equal sizes
    if padded.requires_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_autograd
        parts = all_gather_autograd(padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in range(P)]
        dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


# -----------------------------------------------------------------------------
# video-embedding cache (MR-SP step 2): encode once, reuse for rollouts, prefills and training
class EmbeddingCache:
    """LRU cache of per-video embeddings under a byte budget; evicted entries optionally spill to disk.

    Key = video path + sampling parameters + vision-weights version, so a trainable vision tower
    (version bumped each step) never serves stale embeddings, while a frozen one (RL default) keeps
    serving them across steps and epochs. Values: dict(embeds (N, D), video_grid_thw (1, 3),
    second_per_grid_ts (1,)) on CPU or the model device."""

    def __init__(self, budget_bytes=1 << 30, spill_dir=None):
        from collections import OrderedDict
        self.budget, self.spill_dir = int(budget_bytes), spill_dir
        self.entries = OrderedDict()      # key -> value, least recently used first
        self.on_disk = {}                 # key -> file
        self.bytes = 0
        self.stats = dict(hits=0, disk_hits=0, misses=0, evictions=0, spills=0)
        if spill_dir:
            os.makedirs(spill_dir, exist_ok=True)

    @staticmethod
    def key(video, num_frames=None, fps=None, version=0, **sampling):
        parts = [os.path.abspath(video), f"n={num_frames}", f"fps={fps}", f"v={version}"]
        parts += [f"{k}={sampling[k]}" for k in sorted(sampling)]
        return "|".join(parts)

    @staticmethod
    def nbytes(value):
        return sum(v.numel() * v.element_size() for v in value.values() if torch.is_tensor(v))

    def get(self, key):
        if key in self.entries:
            self.entries.move_to_end(key)
            self.stats["hits"] += 1
            return self.entries[key]
        if key in self.on_disk:
            value = torch.load(self.on_disk.pop(key), weights_only=True)
            self.stats["disk_hits"] += 1
            self.put(key, value)
            return value
        self.stats["misses"] += 1
        return None

    def put(self, key, value):
        n = self.nbytes(value)
        if key in self.entries:
            self.bytes -= self.nbytes(self.entries.pop(key))
        self.entries[key] = value
        self.bytes += n
        while self.bytes > self.budget and len(self.entries) > 1:
            old_key, old = self.entries.popitem(last=False)
            self.bytes -= self.nbytes(old)
            self.stats["evictions"] += 1
            if self.spill_dir:
                import hashlib
                path = os.path.join(self.spill_dir, hashlib.sha1(old_key.encode()).hexdigest() + ".pt")
                torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in old.items()}, path)
                self.on_disk[old_key] = path
                self.stats["spills"] += 1

    def summary(self):
        return dict(self.stats, entries=len(self.entries), bytes=self.bytes, on_disk=len(self.on_disk))


def get_video_embeds(model, processor, records, cache=None, num_frames=None, group=None, version=0, device="cpu"):
    """Video embeddings for records (one video each), through the cache when given. Misses are
    decoded, processed and encoded together with parallel encoding over `group`.
    -> (list of value dicts as stored in the cache, number of videos encoded)."""
    from data import load_video, process_video
    keys = [EmbeddingCache.key(r["video"], num_frames, version=version) for r in records]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)} if cache is not None else {k: None for k in keys}
    todo = [(k, r) for k, r in dict(zip(keys, records)).items() if found[k] is None]
    if todo:
        procs = []
        for _, r in todo:  # every SP rank decodes the video (cheap next to the vision tower)
            frames, info = load_video(r["video"], num_frames=num_frames)
            procs.append(process_video(processor, frames, info))
        grid = torch.cat([p["video_grid_thw"] for p in procs])
        pix = torch.cat([p["pixel_values_videos"] for p in procs]).to(device)
        with torch.no_grad():
            emb = encode_videos(model, pix, grid.to(device), group)
        sizes = (grid.prod(-1) // (processor.video_processor.merge_size ** 2)).tolist()
        for (k, _), p, e in zip(todo, procs, emb.split(sizes)):
            found[k] = dict(embeds=e, video_grid_thw=p["video_grid_thw"], second_per_grid_ts=p["second_per_grid_ts"])
            if cache is not None:
                cache.put(k, found[k])
    return [found[k] for k in keys], len(todo)


# -----------------------------------------------------------------------------
# model inputs from cached embeddings: token embeddings with the video slots filled, 3-D positions
def embed_with_video(model, input_ids, video_embeds):
    """(B, S) ids + (sum N_video, D) embeddings in order -> (B, S, D) inputs_embeds."""
    inner = model.model
    emb = inner.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.video_token_id)
    if int(mask.sum()) != video_embeds.shape[0]:
        raise ValueError(f"{int(mask.sum())} <|video_pad|> tokens but {video_embeds.shape[0]} video embeddings: "
                         f"the prompt and the cached video do not match (frames/size changed?)")
    return emb.masked_scatter(mask.unsqueeze(-1), video_embeds.to(emb.dtype))


def mrope_positions(model, input_ids, mm_token_type_ids, video_grid_thw, second_per_grid_ts, attention_mask=None):
    """3-D mrope positions (3, B, S) on the full sequence, and the per-row delta for later tokens."""
    max_pos = model.config.text_config.max_position_embeddings
    pos, delta = model.model.get_rope_index(input_ids, mm_token_type_ids.long(), video_grid_thw=video_grid_thw,
                                            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask)
    if int(pos.max()) >= max_pos:
        raise ValueError(f"sequence needs position {int(pos.max())} but the model has max_position_embeddings="
                         f"{max_pos}: use fewer frames (--num_frames) or a smaller frame size")
    return pos, delta


# -----------------------------------------------------------------------------
# HF rollout engine: prefill the long video prompt once, replicate its KV cache G times, decode
def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """(B, V) logits -> (tokens (B,), logprobs (B,)) under the temperature-scaled distribution
    (the one the trainer recomputes). temperature 0 is greedy."""
    logp = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]
    filt = logp.clone()
    if top_k and top_k < filt.shape[-1]:
        kth = filt.topk(top_k, dim=-1).values[:, -1:]
        filt[filt < kth] = -float("inf")
    if top_p < 1.0:
        srt, idx = filt.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p               # keep the smallest prefix with mass >= top_p
        srt[drop] = -float("inf")
        filt = torch.full_like(filt, -float("inf")).scatter(-1, idx, srt)
    tok = torch.multinomial(filt.softmax(-1), 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def hf_rollout(model, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256, eos_id=None,
               pad_id=0, generator=None, tokenizer=None):
    """Rollouts from cached video embeddings (never pixels).

    prompts: list of dicts with input_ids (S,), mm_token_type_ids (S,), embeds (N, D),
    video_grid_thw (1, 3), second_per_grid_ts (1,). For each prompt the long [video + question]
    prefix is prefilled ONCE, its KV cache replicated for the n samples, then decoded in lockstep.
    -> dict(token_ids, logprobs, finish_reasons ("stop" | "length"), texts): lists of len(prompts)*n,
       grouped by prompt (the n samples of prompt 0 first)."""
    from transformers import DynamicCache
    eos_id = model.generation_config.eos_token_id if eos_id is None else eos_id
    eos = torch.tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])
    device = next(model.parameters()).device
    lm, head = model.model.language_model, model.lm_head
    out = dict(token_ids=[], logprobs=[], finish_reasons=[])
    for p in prompts:
        ids = p["input_ids"].to(device)[None]                                   # (1, S)
        pos, delta = mrope_positions(model, ids, p["mm_token_type_ids"].to(device)[None],
                                     p["video_grid_thw"].to(device), p["second_per_grid_ts"].to(device))
        cache = DynamicCache(config=lm.config)
        h = lm(inputs_embeds=embed_with_video(model, ids, p["embeds"].to(device)), position_ids=pos,
               cache=cache, use_cache=True).last_hidden_state
        logits = head(h[:, -1]).expand(n, -1)                                   # (n, V) same start for all
        cache.batch_repeat_interleave(n)
        next_pos = int(pos.max()) + 1
        toks, lps = torch.empty(n, 0, dtype=torch.long), torch.empty(n, 0)
        done = torch.zeros(n, dtype=torch.bool)
        for step in range(max_new_tokens):
            tok, lp = sample_next(logits, temperature, top_p, top_k, generator)
            tok = torch.where(done.to(device), torch.full_like(tok, pad_id), tok)
            toks, lps = torch.cat([toks, tok.cpu()[:, None]], 1), torch.cat([lps, lp.cpu()[:, None]], 1)
            done |= torch.isin(tok.cpu(), eos)
            if done.all() or step == max_new_tokens - 1:
                break
            step_pos = torch.full((3, n, 1), next_pos + step, device=device)
            h = lm(input_ids=tok[:, None], position_ids=step_pos, cache=cache, use_cache=True).last_hidden_state
            logits = head(h[:, -1])
        for i in range(n):
            hit = torch.isin(toks[i], eos).nonzero()
            L = int(hit[0]) + 1 if len(hit) else toks.shape[1]
            out["token_ids"].append(toks[i, :L].tolist())
            out["logprobs"].append(lps[i, :L].tolist())
            out["finish_reasons"].append("stop" if len(hit) else "length")
    if tokenizer is not None:
        out["texts"] = [tokenizer.decode(t, skip_special_tokens=True) for t in out["token_ids"]]
    return out


# -----------------------------------------------------------------------------
# config (override with --key=value)
init_tiny_dir = ""         # if set: write the tiny checkpoint here (needs --data) and exit
data = "data/synth"        # dataset folder (for --init_tiny) or a JSONL/JSON file (for the forward check)
model = "out/tiny"         # local HF checkpoint directory
dtype = "float32"          # float32 | bfloat16 | float16
num_frames = 32            # frames sampled uniformly per video
max_samples = 8            # forward check: samples per run (split over ranks)
seed = 0

if __name__ == "__main__":
    # --init_tiny=DIR is the documented spelling; map it onto the config global
    argv = [a.replace("--init_tiny=", "--init_tiny_dir=", 1) for a in sys.argv[1:]]
    apply_overrides(globals(), argv)
    cfg = config_of(globals())
    rank, local_rank, world, device = setup_dist()
    master_process = rank == 0
    print0("config:", json.dumps(cfg))

    # --- tiny checkpoint
    if init_tiny_dir:
        if master_process:
            n = init_tiny(init_tiny_dir, data, seed)
            print(f"wrote tiny Qwen2.5-VL ({n / 1e6:.2f}M params) to {init_tiny_dir}")
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(0)

    # --- forward check: each rank runs its share of the samples through the full input path
    torch.manual_seed(seed)
    net, processor = load_model(model, dtype, device)
    net.eval()
    recs = load_records(data)[:max_samples]
    pad_id = processor.tokenizer.pad_token_id
    losses, n_tok, t0 = [], 0, time.time()
    for rec in recs[rank::world]:
        frames, info = load_video(rec["video"], num_frames=num_frames)
        batch = collate_sft([encode_sample(processor, rec, frames, info)], pad_id)
        with torch.no_grad():
            out = net(**model_inputs(batch, device))
        losses.append(out.loss.item())
        n_tok += batch["input_ids"].numel()
        print(f"[rank {rank}] {rec['id']} ({rec['category']}): {batch['input_ids'].shape[1]} tokens "
              f"({int((batch['mm_token_type_ids'] == 2).sum())} video), loss {losses[-1]:.4f}", flush=True)
    stats = torch.tensor([sum(losses), len(losses), n_tok], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)  # this is a sync point: every rank must reach it
    dt = time.time() - t0
    print0(f"forward check: {int(stats[1])} samples on {world} rank(s), mean loss {stats[0] / max(stats[1], 1):.4f} "
           f"(random init: ~ln(vocab)={torch.log(torch.tensor(float(net.config.text_config.vocab_size))):.2f}), "
           f"{stats[2] / dt:.0f} tokens/s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
