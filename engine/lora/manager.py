"""Which adapters the engine knows, which sit in host memory, and which occupy the device stacks.

- known: every adapter ever added, by lora_int_id (a queued request can always reload its own);
  `names` maps the names requests may use (unloading removes the name only).
- host cache: an LRU of --max-cpu-loras adapters' checked weights; one that falls out is read again
  from its path when a request needs it, on a background thread: its requests wait meanwhile, not the step.
- device slots: --max-loras rows of every LoRALinear's stacks. A sequence holds a reference to its
  adapter's slot from admission to finish or preemption; a slot nobody references stays loaded (a
  later request reuses it) until another adapter needs the room: least recently used first. When all
  slots are referenced, requests for other adapters wait in the scheduler.

The scheduler calls can_acquire / acquire / release between steps (the engine thread); the server
adds and removes adapters from its own thread, hence the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from engine.lora.adapter import AdapterWeights, load_adapter
from engine.lora.layers import LoRALinear
from engine.lora.request import LoRAError, LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, slices: dict[str, tuple[LoRALinear, int]], max_loras: int, max_rank: int, max_cpu_loras: int,
                 multiplier: Callable[[str], float | torch.Tensor | None], inert: dict[str, str] | None = None):
        self.slices, self.max_rank, self.max_cpu_loras, self.multiplier = slices, max_rank, max_cpu_loras, multiplier
        self.inert = inert or {}
        self.shapes = {name: (layer.in_features, layer.sizes[i]) for name, (layer, i) in slices.items()}
        self.known: dict[int, LoRARequest] = {}
        self.names: dict[str, LoRARequest] = {}
        self.host: OrderedDict[int, AdapterWeights] = OrderedDict()
        self.slot_owner: list[int | None] = [None] * max_loras
        self.slot_of: dict[int, int] = {}
        self.refs = [0] * max_loras
        self.idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(max_loras))  # LRU first
        self.num_loads = 0  # adapters copied into a device slot (a reload after eviction counts again)
        self._reads: dict[int, Future] = {}  # adapters being read back into host memory (engine thread)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-read")
        self._next_id = 1
        self._lock = threading.Lock()

    # ---- registry (any thread) ------------------------------------------------------------------

    def add(self, request: LoRARequest) -> None:
        """Reads and checks the adapter (LoRAError) and makes it known; adding a known one again is a no-op."""
        with self._lock:
            known = self.known.get(request.lora_int_id)
            if known is not None:
                if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                    raise LoRAError(f"lora_int_id {request.lora_int_id} is already adapter {known.lora_name!r} "
                                    f"({known.lora_path}); give each adapter its own id")
                self.names.setdefault(request.lora_name, known)
                return
            if self.names.get(request.lora_name, request).lora_int_id != request.lora_int_id:
                raise LoRAError(f"a LoRA adapter named {request.lora_name!r} is already loaded")
        weights = self._read(request)  # outside the lock: it reads files
        with self._lock:
            if self.names.get(request.lora_name, request) != request or request.lora_int_id in self.known:
                raise LoRAError(f"adapter {request.lora_name!r} (id {request.lora_int_id}) was added meanwhile")
            self.known[request.lora_int_id] = request
            self.names[request.lora_name] = request
            self._keep_in_host(weights)
        logger.info("LoRA adapter %r (id %d, rank %d, %d modules) from %s", request.lora_name, request.lora_int_id,
                    weights.rank, len(weights.modules), request.lora_path)

    def remove(self, name: str) -> LoRARequest:
        """Forgets the name (KeyError if unknown); requests already queued with it still finish."""
        with self._lock:
            return self.names.pop(name)

    def next_id(self) -> int:
        """An id no adapter has had (ids are never reused: the prefix cache keys on them)."""
        with self._lock:
            self._next_id = max(self._next_id, max(self.known, default=0) + 1)
            self._next_id += 1
            return self._next_id - 1

    def served(self) -> dict[str, LoRARequest]:
        """The adapters requests may name, by name (a copy)."""
        with self._lock:
            return dict(self.names)

    # ---- device slots (engine thread, between steps) --------------------------------------------

    def can_acquire(self, lora_id: int) -> bool:
        """Whether acquire(lora_id) can run now: the adapter holds a slot, or a slot is free and its weights
        are in host memory (else they are being read: False until then; a failed read is acquire's to raise)."""
        if lora_id in self.slot_of:
            return True
        return bool(self.idle) and self._weights_ready(lora_id)

    def acquire(self, lora_id: int) -> int:
        """The slot holding the adapter, loading it (evicting the least recently used idle one) if needed.
        LoRAError (nothing changed) if the adapter must be read again and its files no longer load."""
        slot = self.slot_of.get(lora_id)
        if slot is None:
            weights = self._host_weights(lora_id)
            slot, _ = self.idle.popitem(last=False)
            old = self.slot_owner[slot]
            if old is not None:
                del self.slot_of[old]
            self._load_slot(slot, weights)
            self.slot_owner[slot], self.slot_of[lora_id] = lora_id, slot
        self.idle.pop(slot, None)
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self.idle[slot] = None  # most recently used

    # ---- internals ------------------------------------------------------------------------------

    def _read(self, request: LoRARequest) -> AdapterWeights:
        return load_adapter(request, self.shapes, self.max_rank, self.multiplier, self.inert)

    def _keep_in_host(self, weights: AdapterWeights) -> None:
        self.host[weights.request.lora_int_id] = weights
        self.host.move_to_end(weights.request.lora_int_id)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def _weights_ready(self, lora_id: int) -> bool:
        """True once the adapter is in host memory or its background read has ended; starts that read."""
        with self._lock:
            if lora_id in self.host:
                return True
            request = self.known[lora_id]
        read = self._reads.get(lora_id)
        if read is None:
            self._reads[lora_id] = self._reader.submit(self._read, request)
            return False
        return read.done()

    def _host_weights(self, lora_id: int) -> AdapterWeights:
        read = self._reads.pop(lora_id, None)
        if read is not None:  # read in the background: its weights, or its LoRAError
            weights = read.result()
            with self._lock:
                self._keep_in_host(weights)
            return weights
        with self._lock:
            weights = self.host.get(lora_id)
            if weights is not None:
                self.host.move_to_end(lora_id)
                return weights
            request = self.known[lora_id]
        weights = self._read(request)
        with self._lock:
            self._keep_in_host(weights)
        return weights

    @torch.no_grad()
    def _load_slot(self, slot: int, weights: AdapterWeights) -> None:
        for name, (layer, index) in self.slices.items():
            a, b = weights.modules.get(name, (None, None))
            layer.set_slice(slot, index, a, b)
        self.num_loads += 1
