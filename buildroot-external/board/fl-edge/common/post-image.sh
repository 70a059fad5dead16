#!/bin/sh
#
# The disk image `flctl flash` writes: genimage builds fl-image.img, a GPT
# disk ([boot,] fl-root, fl-data) from the board's genimage.cfg (or
# genimage.cfg.in), then bmaptool writes its block map and zstd a
# compressed copy (flctl flash and bmaptool copy take either).
#
# $1: the images directory; $2: the board directory
# (BR2_ROOTFS_POST_SCRIPT_ARGS).

set -eu

BOARD_DIR="${2}"
GENIMAGE_CFG="${BOARD_DIR}/genimage.cfg"
GENIMAGE_TMP="${BUILD_DIR}/genimage.tmp"

if [ -f "${BOARD_DIR}/genimage.cfg.in" ]; then
	# Raspberry Pi: the boot partition holds the VideoCore firmware, the
	# device trees and the kernel that config.txt names.
	GENIMAGE_CFG="${BINARIES_DIR}/genimage.cfg"
	kernel=$(sed -n 's/^kernel=//p' "${BINARIES_DIR}/rpi-firmware/config.txt")
	files=$(cd "${BINARIES_DIR}" && for f in ./*.dtb rpi-firmware/* "${kernel}"; do
		printf '\\t\\t\\t"%s",\\n' "${f#./}"
	done)
	sed "s|#BOOT_FILES#|${files}|" "${BOARD_DIR}/genimage.cfg.in" >"${GENIMAGE_CFG}"
fi

# genimage copies --rootpath; the root file system is already built
# (rootfs.ext4), so give it an empty one.
ROOTPATH_TMP="$(mktemp -d)"
trap 'rm -rf "${ROOTPATH_TMP}"' EXIT
rm -rf "${GENIMAGE_TMP}"

genimage \
	--rootpath "${ROOTPATH_TMP}" \
	--tmppath "${GENIMAGE_TMP}" \
	--inputpath "${BINARIES_DIR}" \
	--outputpath "${BINARIES_DIR}" \
	--config "${GENIMAGE_CFG}"

bmaptool create -o "${BINARIES_DIR}/fl-image.img.bmap" "${BINARIES_DIR}/fl-image.img"
zstd -q -f -T0 "${BINARIES_DIR}/fl-image.img" -o "${BINARIES_DIR}/fl-image.img.zst"
