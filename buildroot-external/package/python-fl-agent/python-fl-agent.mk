################################################################################
#
# python-fl-agent
#
################################################################################

# The source is the fl-edge checkout around this tree, so an image and
# the commit it was built from always match. The version is the
# project's (pyproject.toml; tests/test_buildroot_layout.py checks it).
PYTHON_FL_AGENT_VERSION = 0.1.0
PYTHON_FL_AGENT_SITE = $(BR2_EXTERNAL_FL_EDGE_PATH)/..
PYTHON_FL_AGENT_SITE_METHOD = local
PYTHON_FL_AGENT_SETUP_TYPE = setuptools
PYTHON_FL_AGENT_LICENSE = MIT
PYTHON_FL_AGENT_LICENSE_FILES = LICENSE

# What pyproject.toml builds, and nothing else of the checkout (no .venv,
# no build trees, no tests).
PYTHON_FL_AGENT_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude=__pycache__ --exclude='*.pyc' \
	--include=/pyproject.toml --include=/LICENSE --include=/README.md \
	--include='/appliance/***' --include='/aggregator/***' \
	--include=/tools/ --include='/tools/flctl/***' \
	--exclude='*'

# sysusers.d/fl-agent.conf of rootfs-overlay/, made at build time: the
# root file system is read-only, and `flctl flash` reads the agent's
# uid/gid from its /etc/passwd.
PYTHON_FL_AGENT_USERS = \
	fl-agent -1 fl-agent -1 * /var/lib/fl-agent /usr/sbin/nologin video fl-agent (federated learning)

PYTHON_FL_AGENT_SITE_PACKAGES = \
	$(TARGET_DIR)/usr/lib/python$(PYTHON3_VERSION_MAJOR)/site-packages
PYTHON_FL_AGENT_DIST_INFO = \
	$(PYTHON_FL_AGENT_SITE_PACKAGES)/fl_edge-$(PYTHON_FL_AGENT_VERSION).dist-info

# pyproject.toml puts the agent, the aggregator and the host tools in one
# distribution; the device runs the agent only (as meta-fl's recipe does).
define PYTHON_FL_AGENT_KEEP_AGENT_ONLY
	rm -rf $(PYTHON_FL_AGENT_SITE_PACKAGES)/aggregator \
		$(PYTHON_FL_AGENT_SITE_PACKAGES)/flctl
	rm -f $(TARGET_DIR)/usr/bin/fl-aggregator $(TARGET_DIR)/usr/bin/flctl
	$(SED) '/^fl-aggregator *=/d' -e '/^flctl *=/d' \
		$(PYTHON_FL_AGENT_DIST_INFO)/entry_points.txt
	$(SED) '/^aggregator$$/d' -e '/^flctl$$/d' \
		$(PYTHON_FL_AGENT_DIST_INFO)/top_level.txt
endef
PYTHON_FL_AGENT_POST_INSTALL_TARGET_HOOKS += PYTHON_FL_AGENT_KEEP_AGENT_ONLY

# Mount points on the read-only root: /data (data.mount) and the state
# directories var-lib-fl\x2dagent.mount and var-lib-systemd-timesync.mount
# bind from /data onto.
define PYTHON_FL_AGENT_INSTALL_MOUNT_POINTS
	mkdir -p $(TARGET_DIR)/data $(TARGET_DIR)/var/lib/fl-agent \
		$(TARGET_DIR)/var/lib/systemd/timesync
endef
PYTHON_FL_AGENT_POST_INSTALL_TARGET_HOOKS += PYTHON_FL_AGENT_INSTALL_MOUNT_POINTS

$(eval $(python-package))
