"""IfcvfConfig: defaults from the reference, validation that names the field."""
import pytest

from sim.config import ConfigError, IfcvfConfig


def bits(*numbers):
    return sum(1 << n for n in numbers)


def test_defaults_match_the_reference():
    c = IfcvfConfig()
    assert (c.vendor_id, c.device_id) == (0x1AF4, 0x1041)
    assert (c.subsystem_vendor_id, c.subsystem_device_id) == (0x8086, 0x001A)
    assert c.revision == 1 and c.class_code == 0x020000
    assert c.queue_pairs == 4 and c.num_queues == 9
    assert c.max_queue_size == 1024
    assert c.msix_vectors == 10  # config + 9 queues
    assert c.notify_off_multiplier == 0x1000
    assert c.require_access_platform is False
    assert c.device_features == bits(32, 33, 36, 5, 3, 16, 15, 17, 22, 28, 29)
    assert (c.mmio_read_ns, c.doorbell_ns, c.reset_ns, c.queue_stop_ns, c.msix_ns) == (
        1000, 200, 50_000, 5_000, 500)
    assert c.layout == "ifcvf" and c.mtu == 1500 and len(c.mac) == 6


def test_msix_vectors_follow_queue_pairs_unless_given():
    assert IfcvfConfig(queue_pairs=32).msix_vectors == 66
    assert IfcvfConfig(queue_pairs=2, msix_vectors=3).msix_vectors == 3
    assert IfcvfConfig().replace(queue_pairs=1).msix_vectors == 4


@pytest.mark.parametrize("field,value,allowed", [
    ("queue_pairs", 0, "[0x1, 0x20]"),
    ("queue_pairs", 33, "[0x1, 0x20]"),
    ("max_queue_size", 1000, "power of two"),
    ("max_queue_size", 65536, "0x8000"),
    ("notify_off_multiplier", 3, "even power of two"),
    ("layout", "vmware", "'ifcvf' or 'qemu'"),
    ("mac", b"\x01\x02", "6 bytes"),
    ("msix_vectors", 0, "0x80"),
    ("reset_ns", -1, "integer"),
    ("stop_never_acks", 1, "True or False"),
    ("device_features", 1 << 64, "integer"),
])
def test_invalid_values_name_the_field_value_and_rule(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        IfcvfConfig(**{field: value})
    message = str(info.value)
    assert f"IfcvfConfig.{field}" in message
    assert allowed in message


def test_config_is_frozen():
    with pytest.raises(Exception):
        IfcvfConfig().queue_pairs = 2  # type: ignore[misc]


def test_qemu_variant():
    c = IfcvfConfig.qemu_virtio_net()
    assert c.layout == "qemu"
    assert (c.subsystem_vendor_id, c.subsystem_device_id) == (0x1AF4, 0x1100)
    assert c.require_access_platform is True
    assert c.notify_off_multiplier == 4
    assert c.device_features >> 33 & 1 and c.device_features >> 32 & 1
    assert not c.device_features >> 36 & 1  # QEMU does not offer ORDER_PLATFORM
    assert IfcvfConfig.qemu_virtio_net(queue_pairs=1).num_queues == 3


def test_qemu_layout_notify_region_must_hold_every_doorbell():
    with pytest.raises(ConfigError, match="notify_off_multiplier"):
        IfcvfConfig.qemu_virtio_net(notify_off_multiplier=0x1000)
