#
# SPDX-License-Identifier: MIT
#
"""Runtime checks of an fl-image boot: what a user of the appliance relies on.

Run with `bitbake fl-image-dev -c testimage` (TEST_SUITES includes fl_agent;
see kas/fl-image-qemux86-64.yml). The suite needs a login, so it runs on
fl-image-dev; the checks are about properties fl-image has as well.
"""

import json
import time

from oeqa.core.decorator.depends import OETestDepends
from oeqa.runtime.case import OERuntimeTestCase
from oeqa.runtime.decorator.package import OEHasPackage

# RFC 8032 section 7.1, test 1: a valid Ed25519 public key, pinned as the
# aggregator's when the data partition has not been provisioned, so that the
# agent can start without a real aggregator.
TEST_AGGREGATOR_PUB = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
STATE_DIR = "/var/lib/fl-agent"
METRICS_URL = "http://127.0.0.1:9101/metrics"


class FlAgentTest(OERuntimeTestCase):

    def run_ok(self, command, timeout=None):
        status, output = self.target.run(command, timeout)
        self.assertEqual(status, 0, msg=f"'{command}' failed ({status}):\n{output}")
        return output

    def mount_info(self, path):
        output = self.run_ok(f"findmnt --json --output TARGET,SOURCE,FSTYPE,OPTIONS --target {path}")
        return json.loads(output)["filesystems"][0]

    @OETestDepends(['ssh.SSHTest.test_ssh'])
    def test_root_is_read_only(self):
        options = self.mount_info("/")["options"].split(",")
        self.assertIn("ro", options, msg=f"/ is mounted {options}")
        status, output = self.target.run("touch /usr/fl-write-probe")
        self.assertNotEqual(status, 0, msg=f"wrote to the root filesystem: {output}")

    @OETestDepends(['ssh.SSHTest.test_ssh'])
    def test_state_is_on_the_data_partition(self):
        data = self.mount_info("/data")
        self.assertEqual(data["target"], "/data")
        source = data["source"]
        label = self.run_ok(f"lsblk --noheadings --output LABEL {source}").strip()
        self.assertEqual(label, "fl-data", msg=f"/data comes from {source}")
        # The bind mount: a file written through the state directory lands on the data partition.
        probe = "fl-oeqa-probe"
        self.run_ok(f"echo bound > {STATE_DIR}/{probe} && sync")
        self.assertEqual(self.run_ok(f"cat /data/fl-agent/{probe}").strip(), "bound")
        self.run_ok(f"rm {STATE_DIR}/{probe}")

    @OEHasPackage(['fl-agent'])
    @OETestDepends(['fl_agent.FlAgentTest.test_state_is_on_the_data_partition'])
    def test_agent_active(self):
        pub = f"{STATE_DIR}/identity/aggregator.pub"
        status, _ = self.target.run(f"test -s {pub}")
        if status != 0:
            self.run_ok(f"install -d -o fl-agent -g fl-agent -m 0700 {STATE_DIR}/identity")
            self.run_ok(f"echo {TEST_AGGREGATOR_PUB} > {pub} && chown fl-agent:fl-agent {pub}")
            # The image's default URL is plain http (the QEMU rig's address), which the agent refuses unless a
            # config allows it explicitly: the override does, as the rig's provisioning would.
            override = f"{STATE_DIR}/agent.toml"
            if self.target.run(f"test -s {override}")[0] != 0:
                self.run_ok(f"printf '[aggregator]\\nallow_plain_http = true\\n' > {override} && "
                            f"chown fl-agent:fl-agent {override}")
            # Unprovisioned, the agent has been failing at start-up: clear the start limit, then start it.
            self.run_ok("systemctl reset-failed fl-agent.service; systemctl restart fl-agent.service")
        # Type=notify: "active" means the agent said READY=1.
        deadline = time.time() + 300
        state = ""
        while time.time() < deadline:
            state = self.target.run("systemctl is-active fl-agent.service")[1].strip()
            if state in ("active", "failed"):
                break
            time.sleep(5)
        if state != "active":
            journal = self.target.run("journalctl --no-pager -n 50 -u fl-agent.service")[1]
            self.fail(f"fl-agent.service is {state}:\n{journal}")
        user = self.run_ok("systemctl show --property=User --value fl-agent.service").strip()
        self.assertEqual(user, "fl-agent")

    @OETestDepends(['fl_agent.FlAgentTest.test_agent_active'])
    def test_metrics_answer(self):
        script = f"import urllib.request; print(urllib.request.urlopen('{METRICS_URL}', timeout=30).read().decode())"
        output = self.run_ok(f'python3 -c "{script}"', timeout=120)
        self.assertIn("fl_agent_", output, msg=f"no fl_agent_* metric in:\n{output[:2000]}")
