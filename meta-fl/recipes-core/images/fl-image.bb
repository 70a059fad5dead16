# nooelint: oelint.var.suggestedvar.SECTION,oelint.var.suggestedvar.CVE_PRODUCT - an image is no package: it has no section and no CVE product of its own
SUMMARY = "fl-edge appliance image: fl-agent on a read-only root"
DESCRIPTION = "Production image for fl-edge appliances. systemd boots a \
               read-only root filesystem; fl-agent runs as its own user and \
               keeps its state on the fl-data partition, mounted at /data. \
               The disk image (wic.zst with its wic.bmap) is what \
               flctl flash writes to a board."
LICENSE = "MIT"

require fl-image.inc

# Never in a production image, whatever local.conf asks for.
IMAGE_FEATURES:remove = "\
    allow-empty-password \
    allow-root-login \
    debug-tweaks \
    empty-root-password \
    package-management \
    serial-autologin-root \
    tools-debug \
"
