"""Where an instance's attestation channel socket lives, and who can reach it (issue #13)."""

from __future__ import annotations

import stat
from pathlib import Path

from tvorch.adapters.guest_channel import prepare_socket_dir, remove_socket_dir, socket_path
from tvorch.core.launch.domain_xml import guest_channel_path

OLD_XML = """<domain><devices><channel type='unix'><source mode='bind' path='/run/tvorch/channels/i-1.sock'/>
<target type='virtio' name='org.tvorch.attest.0'/></channel>
<channel type='unix'><source mode='bind' path='/elsewhere.sock'/><target type='virtio' name='other'/></channel>
</devices></domain>"""


def test_the_socket_is_where_the_instances_domain_xml_binds_it(tmp_path: Path) -> None:
    assert guest_channel_path(OLD_XML) == "/run/tvorch/channels/i-1.sock"
    assert guest_channel_path("<domain><devices/></domain>") is None
    assert socket_path(tmp_path, "i-1", OLD_XML) == Path("/run/tvorch/channels/i-1.sock")
    # A new instance: a directory of its own.
    assert socket_path(tmp_path, "i-2") == tmp_path / "i-2" / "attest.sock"


def test_the_socket_directory_is_private_even_when_it_was_there_before(tmp_path: Path) -> None:
    channels = tmp_path / "channels"
    socket = socket_path(channels, "i-2")
    socket.parent.mkdir(parents=True, mode=0o755)
    socket.parent.chmod(0o755)
    prepare_socket_dir(socket, channels)
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
    socket.touch()
    remove_socket_dir(socket, channels)
    assert not socket.parent.exists() and channels.is_dir()


def test_an_instance_of_the_old_layout_keeps_its_socket_and_the_shared_directory(tmp_path: Path) -> None:
    channels = tmp_path / "channels"
    old = channels / "i-1.sock"
    prepare_socket_dir(old, channels)
    assert stat.S_IMODE(channels.stat().st_mode) == 0o711
    remove_socket_dir(old, channels)
    assert channels.is_dir()
