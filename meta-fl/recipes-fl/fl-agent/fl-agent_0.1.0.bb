# nooelint: oelint.var.mandatoryvar.HOMEPAGE,oelint.var.suggestedvar.CVE_PRODUCT,oelint.var.bbclassextend - no public home page or CVE product yet; a device service is built for the target only
SUMMARY = "fl-agent: federated learning on edge appliances"
DESCRIPTION = "The device side of fl-edge. It trains ONNX models on frames \
               from the appliance's cameras, signs every update with the \
               device key and delivers it to the aggregator. It runs as the \
               fl-agent systemd service under its own user, with its state \
               on the fl-data partition."
SECTION = "console/network"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=f14c1d7e5be632324cba34cf5cadaa0d"

# meta-fl lives inside the fl-edge repository, and this recipe builds the
# checkout that contains it; the paths in SRC_URI are relative to the
# repository root. pyproject.toml puts the agent, the aggregator and the host
# tools in one distribution, so all three are built; do_install keeps the
# agent only.
FL_EDGE_SRCDIR := "${@os.path.normpath(os.path.join(d.getVar('THISDIR'), '..', '..', '..'))}"
# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - the source tree is the repository around the layer, not a download
FILESEXTRAPATHS:prepend := "${FL_EDGE_SRCDIR}:"
SRC_URI = "\
    file://pyproject.toml;subdir=fl-edge \
    file://LICENSE;subdir=fl-edge \
    file://README.md;subdir=fl-edge \
    file://appliance;subdir=fl-edge \
    file://aggregator;subdir=fl-edge \
    file://tools/flctl;subdir=fl-edge \
    file://rootfs-overlay;subdir=fl-edge \
"
S = "${WORKDIR}/fl-edge"

inherit python_setuptools_build_meta systemd useradd features_check

REQUIRED_DISTRO_FEATURES = "systemd"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --groups video --home-dir ${localstatedir}/lib/fl-agent --no-create-home --shell ${base_sbindir}/nologin --comment 'fl-agent (federated learning)' fl-agent"

FL_OVERLAY = "${S}/rootfs-overlay"

do_install:append() {
    # The device runs the agent only: no aggregator, no host tools.
    rm -rf ${D}${PYTHON_SITEPACKAGES_DIR}/aggregator ${D}${PYTHON_SITEPACKAGES_DIR}/flctl
    rm -f ${D}${bindir}/fl-aggregator ${D}${bindir}/flctl
    sed -i -e '/^fl-aggregator *=/d' -e '/^flctl *=/d' \
        ${D}${PYTHON_SITEPACKAGES_DIR}/fl_edge-${PV}.dist-info/entry_points.txt
    sed -i -e '/^aggregator$/d' -e '/^flctl$/d' \
        ${D}${PYTHON_SITEPACKAGES_DIR}/fl_edge-${PV}.dist-info/top_level.txt

    # rootfs-overlay/, file by file (tests/test_metafl_layer.py checks that
    # every file of the overlay is installed here).
    install -d ${D}${systemd_system_unitdir} ${D}${systemd_unitdir}/system-preset
    install -m 0644 ${FL_OVERLAY}/usr/lib/systemd/system/fl-agent.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${FL_OVERLAY}/usr/lib/systemd/system/data.mount ${D}${systemd_system_unitdir}/
    install -m 0644 "${FL_OVERLAY}/usr/lib/systemd/system/var-lib-fl\x2dagent.mount" ${D}${systemd_system_unitdir}/
    install -m 0644 ${FL_OVERLAY}/usr/lib/systemd/system/var-lib-systemd-timesync.mount ${D}${systemd_system_unitdir}/
    install -d ${D}${systemd_system_unitdir}/systemd-timesyncd.service.d
    install -m 0644 ${FL_OVERLAY}/usr/lib/systemd/system/systemd-timesyncd.service.d/fl-data.conf ${D}${systemd_system_unitdir}/systemd-timesyncd.service.d/
    install -m 0644 ${FL_OVERLAY}/usr/lib/systemd/system-preset/80-fl-agent.preset ${D}${systemd_unitdir}/system-preset/

    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${FL_OVERLAY}/usr/lib/udev/rules.d/70-fl-agent-cameras.rules ${D}${nonarch_base_libdir}/udev/rules.d/

    install -d ${D}${nonarch_libdir}/modules-load.d
    install -m 0644 ${FL_OVERLAY}/usr/lib/modules-load.d/fl-agent.conf ${D}${nonarch_libdir}/modules-load.d/

    install -d ${D}${nonarch_libdir}/tmpfiles.d ${D}${nonarch_libdir}/sysusers.d
    install -m 0644 ${FL_OVERLAY}/usr/lib/tmpfiles.d/fl-agent.conf ${D}${nonarch_libdir}/tmpfiles.d/
    install -m 0644 ${FL_OVERLAY}/usr/lib/tmpfiles.d/fl-timesync.conf ${D}${nonarch_libdir}/tmpfiles.d/
    install -m 0644 ${FL_OVERLAY}/usr/lib/sysusers.d/fl-agent.conf ${D}${nonarch_libdir}/sysusers.d/

    install -d ${D}${sysconfdir}/fl-agent
    install -m 0644 ${FL_OVERLAY}/etc/fl-agent/agent.toml ${D}${sysconfdir}/fl-agent/

    # Mount points on the read-only root: /data (data.mount) and the state
    # directories that var-lib-fl\x2dagent.mount and
    # var-lib-systemd-timesync.mount bind from /data onto.
    install -d -m 0755 ${D}/data
    install -d -m 0750 -o fl-agent -g fl-agent ${D}${localstatedir}/lib/fl-agent
    install -d -m 0755 ${D}${localstatedir}/lib/systemd/timesync
}

SYSTEMD_SERVICE:${PN} = "fl-agent.service data.mount var-lib-fl\x2dagent.mount var-lib-systemd-timesync.mount"

CONFFILES:${PN} = "${sysconfdir}/fl-agent/agent.toml"

FILES:${PN} += "\
    ${nonarch_base_libdir}/udev/rules.d \
    ${systemd_unitdir}/system-preset \
    ${nonarch_libdir}/modules-load.d \
    ${nonarch_libdir}/tmpfiles.d \
    ${nonarch_libdir}/sysusers.d \
    ${localstatedir}/lib/fl-agent \
    ${localstatedir}/lib/systemd/timesync \
    /data \
"

# Every module the agent imports, stdlib included (OE splits python3 into
# packages). tests/test_metafl_layer.py derives the list from appliance/*.py
# and fails when this falls behind.
RDEPENDS:${PN} = "\
    onnxruntime \
    python3-aiohttp \
    python3-asyncio \
    python3-bcrypt \
    python3-cbor2 \
    python3-core \
    python3-crypt \
    python3-cryptography \
    python3-ctypes \
    python3-fcntl \
    python3-io \
    python3-json \
    python3-logging \
    python3-math \
    python3-misc \
    python3-mmap \
    python3-multiprocessing \
    python3-netclient \
    python3-netserver \
    python3-numpy \
    python3-prometheus-client \
    python3-pynacl \
    python3-pyudev \
    python3-pyyaml \
    python3-tomllib \
"

# modules-load.d/fl-agent.conf loads videodev at boot (a soft dependency: on a
# kernel with V4L2 built in there is no module package).
RRECOMMENDS:${PN} = "kernel-module-videodev"
