#!/bin/sh
#
# Runs under fakeroot on the copy of the target tree that becomes the root
# file system ($1). fl-data is mounted on /data at boot, where
# systemd-tmpfiles creates the agent's directories (rootfs-overlay's
# tmpfiles.d/fl-agent.conf and fl-timesync.conf). Buildroot also runs
# tmpfiles at build time, which would leave copies of them in the root
# image underneath the mount point: keep /data an empty mount point.

set -eu

find "${1}/data" -mindepth 1 -delete
