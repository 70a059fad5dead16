"""Device identity on the data partition: key files, their modes, errors that name the file, the device id."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time

import pytest
from nacl.signing import SigningKey

from appliance import identity, wire
from appliance.identity import IdentityError


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_boot_creates_a_0600_key_that_later_boots_load(tmp_path):
    first = identity.load_or_create_device_key(tmp_path)
    path = tmp_path / "identity" / "device.key"
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n") and text[:64] == text[:64].lower()
    assert bytes.fromhex(text[:64]) == bytes(first.signing_key)
    again = identity.load_or_create_device_key(tmp_path)
    assert again.device_id == first.device_id and again.public_key_hex == first.public_key_hex
    assert [p.name for p in path.parent.iterdir()] == ["device.key"]  # no temporary files left behind


def test_key_is_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        identity.load_or_create_device_key(tmp_path)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "identity" / "device.key") == 0o600


def test_device_id_is_first_16_bytes_of_sha256_of_the_public_key():
    key = SigningKey(b"\x07" * 32)
    expected = hashlib.sha256(bytes(key.verify_key)).digest()[:16].hex()
    assert identity.device_id_for(key.verify_key) == expected == wire.key_id(key.verify_key)
    assert len(expected) == 32
    assert identity.DeviceIdentity(key).device_id == expected
    assert identity.DeviceIdentity(key).public_key_hex == bytes(key.verify_key).hex()


def test_written_key_round_trips(tmp_path):
    key = SigningKey(b"\x08" * 32)
    path = identity.write_device_key(tmp_path, key)
    assert mode_of(path) == 0o600
    assert identity.load_device_key(tmp_path).signing_key == key


def test_overwriting_a_key_is_atomic(tmp_path):
    """write_device_key replaces the file with rename: a reader sees the old key or the new one."""
    identity.write_device_key(tmp_path, SigningKey(b"\x01" * 32))
    before = os.stat(tmp_path / "identity" / "device.key").st_ino
    identity.write_device_key(tmp_path, SigningKey(b"\x02" * 32))
    assert os.stat(tmp_path / "identity" / "device.key").st_ino != before
    assert bytes(identity.load_device_key(tmp_path).signing_key) == b"\x02" * 32


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(tmp_path, mode):
    path = identity.write_device_key(tmp_path, SigningKey(b"\x03" * 32))
    path.chmod(mode)
    with pytest.raises(IdentityError, match=f"{re.escape(str(path))}.*readable by others.*{mode:o}"):
        identity.load_device_key(tmp_path)
    with pytest.raises(IdentityError, match=re.escape(str(path))):
        identity.load_or_create_device_key(tmp_path)
    assert bytes.fromhex(path.read_text()) == b"\x03" * 32  # refused, not replaced


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "expected 32 bytes"), ("zz" * 32, "not hex"), ("ab" * 31, "expected 32 bytes"), ("ab" * 33, "found 33")],
)
def test_bad_key_files_are_named_with_the_problem(tmp_path, content, problem):
    path = tmp_path / "identity" / "device.key"
    path.parent.mkdir()
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as info:
        identity.load_device_key(tmp_path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_key_is_named(tmp_path):
    with pytest.raises(IdentityError, match=re.escape(f"{tmp_path / 'identity' / 'device.key'}: key file not found")):
        identity.load_device_key(tmp_path)


def test_unreadable_key_path_is_named(tmp_path):
    (tmp_path / "identity" / "aggregator.pub").mkdir(parents=True)
    with pytest.raises(IdentityError, match=r"aggregator\.pub: cannot read key file"):
        identity.load_aggregator_key(tmp_path)


def test_aggregator_key_round_trip_and_pinning(tmp_path):
    aggregator = SigningKey(b"\x09" * 32)
    path = identity.write_aggregator_key(tmp_path, aggregator.verify_key)
    assert mode_of(path) == 0o644  # public
    loaded = identity.load_aggregator_key(tmp_path)
    assert loaded == aggregator.verify_key
    task = wire.Task(round_id=1, model_version=1, model_digest=b"m" * 32, package_digest=b"p" * 32, deadline=1)
    assert wire.decode_task(wire.encode_task(task, aggregator), loaded).round_id == 1
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode_task(wire.encode_task(task, SigningKey(b"\x0a" * 32)), loaded)
    assert info.value.reason == "unknown-key"


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        identity.write_device_key(tmp_path, SigningKey(b"\x0b" * 32))
    assert list((tmp_path / "identity").iterdir()) == []


def test_concurrent_first_boots_agree_on_one_key(tmp_path, monkeypatch):
    """Two processes creating the key at once (the service and `fl-agent keygen`) must end with one identity.

    Both pass the "no key yet" check before either writes (forced by a barrier in key generation), and one
    is slower to write; it must then load the first's key rather than replace the key the other already uses.
    """
    barrier = threading.Barrier(2, timeout=10)

    class RacingKey(SigningKey):
        @classmethod
        def generate(cls):
            key = SigningKey.generate()
            if barrier.wait() == 0:
                time.sleep(0.3)
            return key

    monkeypatch.setattr(identity, "SigningKey", RacingKey)
    results: list[str] = []
    errors: list[BaseException] = []

    def boot():
        try:
            results.append(identity.load_or_create_device_key(tmp_path).device_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=boot) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    on_disk = identity.load_device_key(tmp_path).device_id
    assert results == [on_disk, on_disk]
    assert [p.name for p in (tmp_path / "identity").iterdir()] == ["device.key"]


def test_interrupted_first_boot_leaves_no_partial_key(tmp_path, monkeypatch):
    """If creation dies before the key is published (power cut, full disk), there is no device.key at all,
    never a truncated one, and the next boot creates a complete key."""

    def cut(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "link", cut)
    with pytest.raises(OSError, match="Input/output"):
        identity.load_or_create_device_key(tmp_path)
    assert list((tmp_path / "identity").iterdir()) == []
    monkeypatch.undo()
    created = identity.load_or_create_device_key(tmp_path)
    assert identity.load_device_key(tmp_path).device_id == created.device_id


@pytest.mark.parametrize("create", [
    lambda state: identity.load_or_create_device_key(state),  # first boot: the key is linked into place
    lambda state: identity.write_device_key(state, SigningKey(b"\x0c" * 32)),  # replaced
], ids=["first-boot", "replaced"])
def test_a_key_is_on_disk_under_its_name_before_it_is_used(tmp_path, monkeypatch, create):
    """The key's bytes are synced before it takes its name, and the directory after: a power cut then loses neither
    the key nor its name, and the device never comes back with another identity than the one it enrolled."""
    calls = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def named(real):
        def call(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            calls.append(("named", str(dst)))
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", named(real_link))
    monkeypatch.setattr(os, "replace", named(real_replace))
    create(tmp_path)
    key = identity.device_key_path(tmp_path)
    at = calls.index(("named", str(key)))
    assert any(call == "fsync" and os.path.basename(path).startswith(".device.key.") for call, path in calls[:at])
    assert ("fsync", str(key.parent)) in calls[at + 1 :], calls
