# nooelint: oelint.var.suggestedvar.SECTION,oelint.var.suggestedvar.CVE_PRODUCT - an image is no package: it has no section and no CVE product of its own
SUMMARY = "fl-edge development image: fl-image with a root login and debug tools"
DESCRIPTION = "fl-image plus an SSH server, an empty root password, strace \
               and findmnt/lsblk, for bring-up and for the oeqa runtime \
               tests (testimage). Never ship it."
LICENSE = "MIT"

require fl-image.inc

# nooelint: oelint.var.badimagefeature.allow-empty-password,oelint.var.badimagefeature.allow-root-login,oelint.var.badimagefeature.empty-root-password - the development image needs a passwordless root login for testimage; fl-image removes these features
IMAGE_FEATURES += "allow-empty-password allow-root-login empty-root-password ssh-server-dropbear"
IMAGE_INSTALL:append = " strace util-linux-findmnt util-linux-lsblk"
