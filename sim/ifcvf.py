"""The simulated IFCVF PCI function: virtio 1.x net registers plus the BAR 4 LM block.

Written from the register reference (ifcvf-hw.md) and the virtio spec, never
from the driver: it imports nothing of ``ifcvf``.

BAR layout "ifcvf" (the default; ``fn.layout.describe()`` prints it)::

    BAR0  64-bit prefetchable, 16 KiB
          0x0000  common cfg      (cap length 0x38; rest of the page reads 0)
          0x1000  ISR             (1 byte; read returns and clears)
          0x2000  device cfg      (virtio-net: mac[6], status, max_vq_pairs, mtu; 12 bytes)
          0x3000  MSI-X table     (16 bytes per vector)
          0x3800  MSI-X PBA
    BAR2  64-bit prefetchable, num_queues * notify_off_multiplier rounded up to a
          power of two, at least 4 KiB: queue q's doorbell at q * multiplier
          (queue_notify_off = q; a 16-bit write of q kicks it)
    BAR4  64-bit prefetchable, 4 KiB: the live-migration block (sim/lm.py)
    BAR1, BAR3, BAR5 absent.

Layout "qemu" (QEMU 7.2 virtio-net-pci, disable-legacy=on)::

    BAR1  32-bit, 4 KiB: MSI-X table @0x0, PBA @0x800
    BAR4  64-bit prefetchable, 16 KiB: common @0x0, ISR @0x1000, device @0x2000,
          notify @0x3000 (multiplier 4); every cap length 0x1000
    no LM block; queue_enable = 0 is not a command but a driver error
    (DEVICE_NEEDS_RESET, "wrong value for queue_enable 0").

Config-space capability list (from 0x34): common, notify (+ multiplier), ISR,
device, PCI-cfg window, MSI-X.

Timing: accesses themselves take no simulated time (the HAL advances the world
by ``mmio_read_ns`` before a read); the delayed effects are simpy timeouts on the
world: a reset completes ``reset_ns`` after device_status = 0, a stop is
acknowledged ``queue_stop_ns`` after queue_enable = 0 at the earliest, a
doorbell lands after ``doorbell_ns``, an MSI-X message after ``msix_ns``.

Things the virtio spec leaves open, decided here:
- device_status writes may only add bits; a write that would clear one is
  refused whole.  FEATURES_OK is refused when the accepted features are not a
  subset of the offered ones (or lack ACCESS_PLATFORM when it is required);
  DRIVER_OK is refused without FEATURES_OK.  A refused bit does not read back.
- Reset (device_status = 0) of a device whose status is already 0 completes at
  once: nothing is in flight.  While a reset is in progress device_status keeps
  reading its old, non-zero value and every common-config write is ignored.
- Queue size, ring addresses: writes are refused while the queue is enabled.
  Queue sizes must be powers of two in 1..max (split rings).
- A device reset clears every queue, ring-state word, feature and vector field,
  but not the LM logging registers or the MQ register (the driver programs
  those outside the virtio start sequence).
"""
from __future__ import annotations

from typing import Callable

from sim import virtio_regs as vr
from sim.config import IfcvfConfig
from sim.dma import DmaDomain
from sim.layout import BarLayout, Region, layout_for
from sim.lm import LmBlock
from sim.msix import MsixTable
from sim.pcie import PciConfigSpace, PciIdentity, check_access, check_value
from sim.engines import Datapath
from sim.queue_state import IdleEngine, QueueEngine, QueueState
from sim.world import World

EngineFactory = Callable[["IfcvfFunction", QueueState], QueueEngine]

_COMMON_READ_ONLY = ("device_feature", "num_queues", "config_generation", "queue_notify_off")


class IfcvfFunction:
    """One simulated IFCVF virtio-net VF."""

    def __init__(self, world: World, config: IfcvfConfig, name: str = "vf0",
                 engine_factory: EngineFactory | None = None):
        self.world = world
        self.config = config
        self.name = name
        self.layout: BarLayout = layout_for(config)
        self.errors: list[str] = []
        # (cycle, queue, running): when each queue's engine started, and when it
        # stopped for good (stop acknowledged, or reset).  A migration checker
        # reads it to prove source and destination never ran at once.
        self.activity: list[tuple[int, int, bool]] = []
        self.doorbell_mismatches = 0

        # A DmaDomain is an IommuDomain that counts its changes, so the datapath's C
        # view of the mappings is rebuilt exactly when they change (sim/dma.py).
        self.iommu = DmaDomain(world, f"{name}.iommu")
        self.pci = PciConfigSpace(
            PciIdentity(config.vendor_id, config.device_id, config.subsystem_vendor_id,
                        config.subsystem_device_id, config.revision, config.class_code,
                        interrupt_pin=1 if config.layout == "qemu" else 0),
            self.layout.bars, self._recorder("pci"))
        lay = self.layout
        self.pci.add_virtio_cap(vr.VIRTIO_PCI_CAP_COMMON_CFG, lay.common.bar, lay.common.offset,
                                lay.common.length)
        self.pci.add_virtio_cap(vr.VIRTIO_PCI_CAP_NOTIFY_CFG, lay.notify.bar, lay.notify.offset,
                                lay.notify.length,
                                extra=config.notify_off_multiplier.to_bytes(4, "little"))
        self.pci.add_virtio_cap(vr.VIRTIO_PCI_CAP_ISR_CFG, lay.isr.bar, lay.isr.offset,
                                lay.isr.length)
        self.pci.add_virtio_cap(vr.VIRTIO_PCI_CAP_DEVICE_CFG, lay.device.bar, lay.device.offset,
                                lay.device.length)
        self.pci_cfg = self.pci.add_virtio_pci_cfg_cap(self)
        self.msix_cap = self.pci.add_msix_capability(
            config.msix_vectors, lay.msix_table.bar, lay.msix_table.offset,
            lay.msix_pba.bar, lay.msix_pba.offset)
        self.msix = MsixTable(world, self.msix_cap, config.msix_vectors,
                              world.cycles(config.msix_ns), name=f"{name}.msix")

        self.queues = [QueueState(index=q, max_size=config.max_queue_size, notify_off=q)
                       for q in range(config.num_queues)]
        # The datapath (sim/engines.py): split-ring engines, the PCIe link they share,
        # hardware dirty logging and the VF's 100G port (``fn.port``, sim/wire.py).
        # The default engine factory gives RX engines to even queues, TX engines to
        # odd ones and an idle engine to the control vq; ``engine_factory`` replaces it.
        self.datapath = Datapath(self)
        self.port = self.datapath.port
        factory = engine_factory or self.datapath.engine_for
        for queue in self.queues:
            queue.engine = factory(self, queue)
        self.lm: LmBlock | None = (LmBlock(world, f"{name}.lm", self.queues, config.queue_pairs)
                                   if lay.lm is not None else None)

        self.link_up = config.link_up
        self._status = 0
        self._resetting = False
        self._reset_epoch = 0
        self._device_feature_select = 0
        self._guest_feature_select = 0
        self._driver_features = 0
        self._msix_config = vr.NO_VECTOR
        self._queue_select = 0
        self._config_generation = 0
        self._isr = 0

        self._writers: dict[str, Callable[[int], None]] = {
            "device_feature_select": self._write_device_feature_select,
            "guest_feature_select": self._write_guest_feature_select,
            "guest_feature": self._write_guest_feature,
            "msix_config": self._write_msix_config,
            "device_status": self._write_device_status,
            "queue_select": self._write_queue_select,
            "queue_size": self._write_queue_size,
            "queue_msix_vector": self._write_queue_msix_vector,
            "queue_enable": self._write_queue_enable,
        }
        for ring in ("desc", "avail", "used"):
            for half in ("lo", "hi"):
                reg = f"queue_{ring}_{half}"
                self._writers[reg] = lambda value, reg=reg: self._write_address(reg, value)

        self._decoders: dict[int, list[tuple[Region, Callable, Callable]]] = {}
        self._write_targets: dict = {}   # (bar, offset, width) -> (write, offset in region) | False
        self._route(lay.common, self._common_read, self._common_write)
        self._route(lay.isr, self._isr_read, self._isr_write)
        self._route(lay.device, self._device_read, self._device_write)
        self._route(lay.notify, self._notify_read, self._notify_write)
        self._route(lay.msix_table, self.msix.table_read, self.msix.table_write)
        self._route(lay.msix_pba, self.msix.pba_read, self.msix.pba_write)
        if self.lm is not None:
            self._route(lay.lm, self.lm.read, self.lm.write)

    # ======================================================================
    # public: config space and BARs
    # ======================================================================
    def config_read(self, offset: int, size: int) -> int:
        if self.removed:
            return (1 << (8 * size)) - 1
        return self.pci.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self.removed:
            return
        self.pci.write(offset, size, value)

    removed = False
    """Fault knob (``surprise_remove``): the function is gone from the bus."""

    def surprise_remove(self) -> None:
        """Fault: the function disappears (hot-unplug, link down): every config and
        MMIO read returns all ones, writes go nowhere, and no DMA happens any
        more (every engine stops where it is, without acknowledging anything)."""
        if self.removed:
            return
        self.removed = True
        self._record("surprise_removal")
        for queue in self.queues:
            if queue.running:
                queue.running = False
                queue.engine.stop(lambda: None)
            if queue.enabled:
                self.activity.append((self.world.now, queue.index, False))   # no DMA from here on

    def bar_size(self, bar: int) -> int | None:
        spec = self.layout.bar(bar)
        return None if spec is None else spec.size

    # The rest of the SimDevice protocol (sim/device.py).
    @property
    def dma(self) -> DmaDomain:
        return self.iommu

    @property
    def mmio_read_ns(self) -> float:
        return self.config.mmio_read_ns

    def bind_msix(self, vector: int, eventfd: int) -> None:
        self.msix.bind(vector, eventfd)

    def mmio_read(self, bar: int, offset: int, width: int) -> int:
        self._check_mmio(bar, offset, width)
        if self.removed:
            return (1 << (8 * width)) - 1
        if not self.pci.memory_enabled:
            self._record("mmio_decode_off", bar=bar, offset=offset, width=width, op="read")
            return (1 << (8 * width)) - 1
        return self.bar_read(bar, offset, width)

    def mmio_write(self, bar: int, offset: int, width: int, value: int) -> None:
        # An address decodes the same way for the model's life (regions are
        # routed once, in __init__), so the caller-bug checks and the region
        # walk run on an address's first write only: every kick is one.
        target = self._write_targets.get((bar, offset, width))
        if target is None:
            self._check_mmio(bar, offset, width)
            decoded = self._decode(bar, offset)
            target = False if decoded is None else (decoded[2], offset - decoded[0].offset)
            if len(self._write_targets) < 4096:
                self._write_targets[(bar, offset, width)] = target
        if type(value) is not int or not 0 <= value < 1 << (8 * width):
            check_value(value, width, f"{self.name} BAR{bar}")
        if self.removed:
            return
        if not self.pci.memory_enabled:
            self._record("mmio_decode_off", bar=bar, offset=offset, width=width, op="write")
            return
        if target is False:
            self.bar_write(bar, offset, width, value)      # unassigned: recorded there
        else:
            target[0](target[1], width, value)

    # BarAccess for the PCI-cfg window (and tests): a BAR access without the
    # memory-decode gate and without the caller-bug checks; the caller has
    # validated bar, offset and width.
    def bar_read(self, bar: int, offset: int, width: int) -> int:
        decoded = self._decode(bar, offset)
        if decoded is None:
            self._record("mmio_unassigned", bar=bar, offset=offset, width=width, op="read")
            return 0
        region, read, _ = decoded
        return read(offset - region.offset, width)

    def bar_write(self, bar: int, offset: int, width: int, value: int) -> None:
        decoded = self._decode(bar, offset)
        if decoded is None:
            self._record("mmio_unassigned", bar=bar, offset=offset, width=width, op="write",
                         value=value)
            return
        region, _, write = decoded
        write(offset - region.offset, width, value)

    # ======================================================================
    # public: inspection for tests and the datapath
    # ======================================================================
    @property
    def status(self) -> int:
        return self._status

    @property
    def driver_features(self) -> int:
        return self._driver_features

    @property
    def msix_config(self) -> int:
        return self._msix_config

    @property
    def config_generation(self) -> int:
        return self._config_generation

    @property
    def isr_pending(self) -> int:
        """ISR bits without the read-to-clear side effect."""
        return self._isr

    @property
    def resetting(self) -> bool:
        return self._resetting

    @property
    def needs_reset(self) -> bool:
        return bool(self._status & vr.STATUS_DEVICE_NEEDS_RESET)

    @property
    def bus_master(self) -> bool:
        return self.pci.bus_master

    def queue(self, index: int) -> QueueState:
        if not 0 <= index < len(self.queues):
            raise ValueError(f"{self.name}: queue {index} does not exist "
                             f"(0..{len(self.queues) - 1})")
        return self.queues[index]

    def set_engine(self, index: int, engine: QueueEngine) -> None:
        """Replace one queue's engine (only while it is not running)."""
        queue = self.queue(index)
        if queue.running or queue.stopping:
            raise RuntimeError(f"{self.name}: queue {index} is running; stop it first")
        queue.engine = engine

    # ======================================================================
    # public: device-side events
    # ======================================================================
    def set_link(self, up: bool) -> None:
        """Change VIRTIO_NET_S_LINK_UP; a change bumps config_generation and interrupts."""
        if up == self.link_up:
            return
        self.link_up = up
        self._config_generation = (self._config_generation + 1) & 0xFF
        self._record("link", up=up, generation=self._config_generation)
        self.raise_config_interrupt()

    def mark_needs_reset(self, reason: str) -> None:
        """The device hit an error it cannot recover from without a reset."""
        self._status |= vr.STATUS_DEVICE_NEEDS_RESET
        self.errors.append(reason)
        self._record("needs_reset", reason=reason)
        self.raise_config_interrupt()

    def raise_config_interrupt(self) -> None:
        self._isr |= vr.ISR_CONFIG
        if self._msix_config != vr.NO_VECTOR:
            self.msix.fire(self._msix_config)

    def raise_queue_interrupt(self, index: int) -> None:
        """A used-buffer notification for queue ``index`` (engines call this)."""
        queue = self.queue(index)
        if not self.msix_cap.enabled:
            # The ISR queue bit is for INTx-style delivery only (virtio 4.1.4.5).
            self._isr |= vr.ISR_QUEUE
        if queue.msix_vector != vr.NO_VECTOR:
            self.msix.fire(queue.msix_vector)

    # ======================================================================
    # decoding
    # ======================================================================
    def _route(self, region: Region, read: Callable, write: Callable) -> None:
        self._decoders.setdefault(region.bar, []).append((region, read, write))

    def _decode(self, bar: int, offset: int):
        for entry in self._decoders.get(bar, ()):
            if entry[0].decodes(bar, offset):
                return entry
        return None

    def _check_mmio(self, bar: int, offset: int, width: int) -> None:
        size = self.bar_size(bar)
        if size is None:
            raise ValueError(f"{self.name}: BAR{bar} does not exist")
        check_access(offset, width, size, f"{self.name} BAR{bar}")
        if offset % width:
            raise ValueError(f"{self.name} BAR{bar}: {width}-byte access at {offset:#x} "
                             "is misaligned")

    # ======================================================================
    # common configuration
    # ======================================================================
    def _selected(self) -> QueueState | None:
        if self._queue_select < len(self.queues):
            return self.queues[self._queue_select]
        return None

    def _common_value(self, name: str) -> int:
        queue = self._selected()
        if name == "device_feature_select":
            return self._device_feature_select
        if name == "device_feature":
            return _feature_window(self.config.device_features, self._device_feature_select)
        if name == "guest_feature_select":
            return self._guest_feature_select
        if name == "guest_feature":
            return _feature_window(self._driver_features, self._guest_feature_select)
        if name == "msix_config":
            return self._msix_config
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self._status
        if name == "config_generation":
            return self._config_generation
        if name == "queue_select":
            return self._queue_select
        if queue is None:
            return vr.NO_VECTOR if name == "queue_msix_vector" else 0
        if name == "queue_size":
            return queue.size
        if name == "queue_msix_vector":
            return queue.msix_vector
        if name == "queue_enable":
            return int(queue.enabled)
        if name == "queue_notify_off":
            return queue.notify_off
        field, half = name.rsplit("_", 1)  # queue_desc_lo -> queue_desc, lo
        address = getattr(queue, field.removeprefix("queue_"))
        return address & 0xFFFF_FFFF if half == "lo" else address >> 32

    def _common_read(self, offset: int, width: int) -> int:
        # Compose the bytes of whatever registers the access covers; reads of
        # the common config have no side effects, so splitting is harmless.
        value = 0
        for i in range(width):
            byte_off = offset + i
            reg = _register_at(byte_off)
            if reg is None:
                continue
            name, reg_off, reg_width = reg
            byte = self._common_value(name) >> (8 * (byte_off - reg_off)) & 0xFF
            value |= byte << (8 * i)
        return value

    def _common_write(self, offset: int, width: int, value: int) -> None:
        reg = _register_at(offset)
        if reg is None or reg[1] + reg[2] < offset + width:
            self._record("common_write_unassigned", offset=offset, width=width, value=value)
            return
        name, reg_off, reg_width = reg
        if width != reg_width:
            # A narrower write replaces some bytes of the register (e.g. a
            # 16-bit half of a 32-bit ring address).
            shift = 8 * (offset - reg_off)
            mask = ((1 << (8 * width)) - 1) << shift
            value = (self._common_value(name) & ~mask) | (value << shift)
        if self._resetting:
            self._record("write_during_reset", register=name, value=value)
            return
        if name in _COMMON_READ_ONLY:
            self._record("read_only_write", register=name, value=value)
            return
        self._writers[name](value)

    def _write_device_feature_select(self, value: int) -> None:
        self._device_feature_select = value

    def _write_guest_feature_select(self, value: int) -> None:
        self._guest_feature_select = value

    def _write_guest_feature(self, value: int) -> None:
        if self._status & vr.STATUS_FEATURES_OK:
            self._record("features_after_features_ok", select=self._guest_feature_select,
                         value=value)
            return
        select = self._guest_feature_select
        if select not in (0, 1):
            self._record("guest_feature_select_invalid", select=select, value=value)
            return
        shift = 32 * select
        self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | value << shift

    def _valid_vector(self, value: int) -> int:
        return value if value < self.config.msix_vectors else vr.NO_VECTOR

    def _write_msix_config(self, value: int) -> None:
        self._msix_config = self._valid_vector(value)
        if self._msix_config != value:
            self._record("vector_refused", register="msix_config", value=value)

    def _write_queue_select(self, value: int) -> None:
        self._queue_select = value

    def _write_queue_size(self, value: int) -> None:
        queue = self._queue_for_write("queue_size", value)
        if queue is None:
            return
        if value == 0 or value > queue.max_size or value & (value - 1):
            self._record("queue_size_refused", qid=queue.index, value=value, max=queue.max_size)
            return
        queue.size = value

    def _write_queue_msix_vector(self, value: int) -> None:
        queue = self._selected()
        if queue is None:
            self._record("absent_queue_write", register="queue_msix_vector",
                         qid=self._queue_select, value=value)
            return
        queue.msix_vector = self._valid_vector(value)
        if queue.msix_vector != value:
            self._record("vector_refused", register="queue_msix_vector", qid=queue.index,
                         value=value)

    def _write_queue_enable(self, value: int) -> None:
        queue = self._selected()
        if queue is None:
            self._record("absent_queue_write", register="queue_enable",
                         qid=self._queue_select, value=value)
            return
        if value == 1:
            self._enable_queue(queue)
        elif self.config.layout == "qemu":
            self.mark_needs_reset(f"wrong value for queue_enable {value:x}")
        elif value == 0:
            self._stop_queue(queue)
        else:
            self._record("queue_enable_value_ignored", qid=queue.index, value=value)

    def _write_address(self, name: str, value: int) -> None:
        queue = self._queue_for_write(name, value)
        if queue is None:
            return
        field, half = name.removeprefix("queue_").rsplit("_", 1)
        address = getattr(queue, field)
        if half == "lo":
            address = (address & ~0xFFFF_FFFF) | value
        else:
            address = (address & 0xFFFF_FFFF) | value << 32
        setattr(queue, field, address)

    def _queue_for_write(self, name: str, value: int) -> QueueState | None:
        """The selected queue if its configuration may change now, else None (traced)."""
        queue = self._selected()
        if queue is None:
            self._record("absent_queue_write", register=name, qid=self._queue_select, value=value)
            return None
        if queue.enabled:
            self._record("queue_config_while_enabled", register=name, qid=queue.index,
                         value=value)
            return None
        return queue

    # --- device_status ------------------------------------------------------------------
    def _write_device_status(self, value: int) -> None:
        if value == 0:
            self._start_reset()
            return
        old = self._status
        cleared = old & vr.STATUS_DRIVER_BITS & ~value
        if cleared:
            self._record("status_clear_refused", status=old, value=value)
            return
        ignored = value & ~vr.STATUS_DRIVER_BITS
        if ignored & ~old:
            self._record("status_bits_ignored", value=value, bits=ignored & ~old)
        add = value & vr.STATUS_DRIVER_BITS & ~old
        if add & vr.STATUS_FEATURES_OK:
            reason = self._features_refusal()
            if reason:
                add &= ~vr.STATUS_FEATURES_OK
                self._record("features_ok_refused", reason=reason,
                             features=self._driver_features)
        if add & vr.STATUS_DRIVER_OK and not (old | add) & vr.STATUS_FEATURES_OK:
            add &= ~vr.STATUS_DRIVER_OK
            self._record("driver_ok_refused", reason="FEATURES_OK not set")
        if not add:
            return
        self._status = old | add
        self._record("status", status=self._status)
        if add & vr.STATUS_DRIVER_OK:
            for queue in self.queues:
                self._start_engine(queue)

    def _features_refusal(self) -> str:
        extra = self._driver_features & ~self.config.device_features
        if extra:
            return f"features {extra:#x} were not offered"
        if (self.config.require_access_platform
                and not self._driver_features >> vr.F_ACCESS_PLATFORM & 1):
            return "ACCESS_PLATFORM is required"
        return ""

    def _start_reset(self) -> None:
        if self._resetting:
            self._record("reset_already_in_progress")
            return
        for queue in self.queues:
            if queue.running or queue.stopping:
                self.activity.append((self.world.now, queue.index, False))
            if queue.running:
                queue.running = False
                queue.engine.stop(lambda: None)
            queue.epoch += 1  # cancels pending stop acknowledgements
        if self._status == 0:
            self._finish_reset(self._reset_epoch)
            return
        self._resetting = True
        self._reset_epoch += 1
        epoch = self._reset_epoch
        self._record("reset_start", status=self._status)
        if self.config.reset_never_completes:
            return
        self._after(self.world.cycles(self.config.reset_ns), lambda: self._finish_reset(epoch))

    def _finish_reset(self, epoch: int) -> None:
        if epoch != self._reset_epoch:
            return
        self._resetting = False
        self._status = 0
        self._device_feature_select = self._guest_feature_select = 0
        self._driver_features = 0
        self._msix_config = vr.NO_VECTOR
        self._queue_select = 0
        self._isr = 0
        for queue in self.queues:
            queue.reset()
        self._record("reset_done")

    # --- queue enable and the IFCVF stop handshake -----------------------------------------
    def _enable_queue(self, queue: QueueState) -> None:
        if queue.enabled:
            self._record("queue_enable_ignored", qid=queue.index, stopping=queue.stopping)
            return
        queue.enabled = True
        queue.stopped = False
        # The restore state (LM ring-state word) is loaded into the live indexes.
        queue.last_avail = queue.ring_state & 0xFFFF
        queue.last_used = queue.ring_state >> 16
        self._record("queue_enable", qid=queue.index, size=queue.size,
                     last_avail=queue.last_avail, last_used=queue.last_used)
        self._start_engine(queue)

    def _start_engine(self, queue: QueueState) -> None:
        if (queue.running or not queue.enabled or queue.stopping
                or not self._status & vr.STATUS_DRIVER_OK):
            return
        queue.running = True
        self.activity.append((self.world.now, queue.index, True))
        queue.engine.start()

    def _stop_queue(self, queue: QueueState) -> None:
        if not queue.enabled or queue.stopping:
            self._record("queue_stop_ignored", qid=queue.index, enabled=queue.enabled,
                         stopping=queue.stopping)
            return
        queue.stopping = True
        queue.epoch += 1
        epoch = queue.epoch
        waiting = {"engine": True, "timer": True}
        self._record("queue_stop", qid=queue.index)

        def arrived(what: str) -> None:
            waiting[what] = False
            if queue.epoch != epoch or not queue.stopping or any(waiting.values()):
                return
            if self.config.stop_never_acks:
                self._record("queue_stop_never_acks", qid=queue.index)
                return
            self._ack_stop(queue)

        if queue.running:
            queue.running = False
            queue.engine.stop(lambda: arrived("engine"))
        else:
            arrived("engine")
        self._after(self.world.cycles(self.config.queue_stop_ns), lambda: arrived("timer"))

    def _ack_stop(self, queue: QueueState) -> None:
        queue.stopping = False
        queue.enabled = False
        queue.stopped = True
        queue.ring_state = queue.live_ring_state
        self.activity.append((self.world.now, queue.index, False))
        self._record("queue_stopped", qid=queue.index, last_avail=queue.last_avail,
                     last_used=queue.last_used)

    # ======================================================================
    # ISR, device config, notify
    # ======================================================================
    def _isr_read(self, offset: int, width: int) -> int:
        if offset != 0:
            return 0
        value, self._isr = self._isr, 0
        return value

    def _isr_write(self, offset: int, width: int, value: int) -> None:
        self._record("isr_write_ignored", offset=offset, value=value)

    def _device_config(self) -> bytes:
        status = vr.NET_S_LINK_UP if self.link_up else 0
        return (self.config.mac + status.to_bytes(2, "little")
                + self.config.queue_pairs.to_bytes(2, "little")
                + self.config.mtu.to_bytes(2, "little"))

    def _device_read(self, offset: int, width: int) -> int:
        image = self._device_config()
        chunk = image[offset:offset + width] if offset < len(image) else b""
        return int.from_bytes(chunk.ljust(width, b"\0"), "little")

    def _device_write(self, offset: int, width: int, value: int) -> None:
        self._record("device_cfg_write_ignored", offset=offset, width=width, value=value)

    def _notify_read(self, offset: int, width: int) -> int:
        return 0

    def _notify_write(self, offset: int, width: int, value: int) -> None:
        mult = self.config.notify_off_multiplier
        if mult:
            qid, within = divmod(offset, mult)
        else:
            qid, within = value, offset
        if width != 2 or within != 0 or qid >= len(self.queues):
            self._record("notify_unassigned", offset=offset, width=width, value=value)
            return
        if value != qid:
            # The address picks the queue (as QEMU does); the value should agree.
            self.doorbell_mismatches += 1
            self._record("doorbell_value_mismatch", qid=qid, value=value)
        queue = self.queues[qid]
        # = self._after(cycles, lambda: self._doorbell(queue)), without two lambdas per kick
        cycles = self.world.cycles(self.config.doorbell_ns)
        if cycles <= 0:
            self._doorbell(queue)
        else:
            self.world.call_with(self.world.env._now + cycles, self._doorbell, queue)

    def _doorbell(self, queue: QueueState) -> None:
        queue.doorbells += 1
        if queue.running:
            world = self.world
            # = self._record("doorbell", qid=queue.index)
            world.trace.add(f"{world.env._now} {self.name} doorbell qid={queue.index}\n",
                            "doorbell")
            queue.engine.kick()
        else:
            self._record("doorbell_idle_queue", qid=queue.index)

    # ======================================================================
    # helpers
    # ======================================================================
    def _after(self, cycles: int, callback: Callable[[], None]) -> None:
        if cycles <= 0:
            callback()
            return
        # (= world.timeout(cycles).callbacks.append(...), without the Timeout)
        self.world.call_at(self.world.env._now + cycles, lambda _event: callback())

    def _record(self, event: str, **fields) -> None:
        self.world.record(self.name, event, **fields)

    def _recorder(self, part: str):
        source = f"{self.name}.{part}"
        return lambda event, **fields: self.world.record(source, event, **fields)


def _feature_window(features: int, select: int) -> int:
    return features >> (32 * select) & 0xFFFF_FFFF if select in (0, 1) else 0


def _register_map() -> list[tuple[str, int, int] | None]:
    by_byte: list[tuple[str, int, int] | None] = [None] * vr.COMMON_CFG_SIZE
    for name, (offset, width) in vr.COMMON_REGISTERS.items():
        for pos in range(offset, offset + width):
            by_byte[pos] = (name, offset, width)
    return by_byte


_REGISTER_BY_BYTE = _register_map()


def _register_at(offset: int) -> tuple[str, int, int] | None:
    """The common-config register holding byte ``offset``: (name, offset, width)."""
    return _REGISTER_BY_BYTE[offset] if offset < len(_REGISTER_BY_BYTE) else None


__all__ = ["IfcvfFunction", "IfcvfConfig", "EngineFactory", "QueueState", "IdleEngine"]
