#!/bin/sh
#
# onnxruntime's cmake fetches its third-party sources (abseil, protobuf,
# onnx, eigen, ...) with FetchContent from the URLs in cmake/deps.txt, and
# checks each against the SHA1 written there. Buildroot builds offline
# after `make source`, so:
#
#   onnxruntime-deps.sh fetch TARBALL TOPDIR DESTDIR
#       reads TOPDIR/cmake/deps.txt out of the (hash-checked) source
#       archive and downloads every archive it lists, except those named
#       in $ONNXRUNTIME_DEPS_SKIP, into DESTDIR, checking the SHA1;
#   onnxruntime-deps.sh localize DEPS_TXT DESTDIR
#       points the URLs in the extracted deps.txt at the files in
#       DESTDIR, so that cmake reads them instead of the network.

set -e

fetch() {
	tarball="$1"
	topdir="$2"
	dest="$3"
	mkdir -p "${dest}"
	tar -xOf "${tarball}" "${topdir}/cmake/deps.txt" >"${dest}/deps.txt"
	grep -v '^#' "${dest}/deps.txt" | while IFS=';' read -r name url sha1; do
		[ -n "${name}" ] || continue
		case " ${ONNXRUNTIME_DEPS_SKIP} " in
		*" ${name} "*) continue ;;
		esac
		file="${dest}/${name}-${url##*/}"
		if [ ! -f "${file}" ]; then
			${WGET:-wget} -O "${file}.tmp" "${url}"
			mv "${file}.tmp" "${file}"
		fi
		sha1=$(printf '%s' "${sha1}" | tr 'A-F' 'a-f')
		if ! printf '%s  %s\n' "${sha1}" "${file}" | sha1sum -c --status; then
			echo "onnxruntime-deps.sh: ${file}: SHA1 is not ${sha1} (cmake/deps.txt)" >&2
			rm -f "${file}"
			exit 1
		fi
	done
}

localize() {
	deps_txt="$1"
	dest="$2"
	awk -F';' -v OFS=';' -v dest="${dest}" '
		/^#/ || NF < 3 { print; next }
		{
			n = split($2, parts, "/")
			file = dest "/" $1 "-" parts[n]
			if (system("test -f \"" file "\"") == 0) { $2 = file }
			print
		}' "${deps_txt}" >"${deps_txt}.local"
	mv "${deps_txt}.local" "${deps_txt}"
}

case "$1" in
fetch)
	shift
	fetch "$@"
	;;
localize)
	shift
	localize "$@"
	;;
*)
	echo "usage: $0 fetch TARBALL TOPDIR DESTDIR | localize DEPS_TXT DESTDIR" >&2
	exit 1
	;;
esac
