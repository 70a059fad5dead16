# nooelint: oelint.var.suggestedvar.SECTION,oelint.var.suggestedvar.CVE_PRODUCT - pypi.bbclass sets both
SUMMARY = "Prometheus instrumentation library for Python applications"
DESCRIPTION = "The official Python client for Prometheus: counters, gauges, \
               histograms and summaries, exposed over HTTP in the \
               Prometheus text format."
HOMEPAGE = "https://github.com/prometheus/client_python"
# decorator.py is bundled under the 2-clause BSD licence (see NOTICE).
LICENSE = "Apache-2.0 & BSD-2-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=86d3f3a95c324c9479bd8986968f4327 \
                    file://NOTICE;md5=4951b46e0743f84957d24051dcbdc0ae"

# 0.21.1 is the last release that builds with scarthgap's setuptools 69:
# 0.22 and later require setuptools >= 77 (PEP 639 licence metadata).
SRC_URI[sha256sum] = "252505a722ac04b0456be05c05f75f45d760c2911ffc45f2a06bcaed9f3ae3fb"

PYPI_PACKAGE = "prometheus_client"

inherit pypi python_setuptools_build_meta

# python3-misc carries wsgiref and timeit, which exposition.py imports at load time.
RDEPENDS:${PN} += "\
    python3-compression \
    python3-core \
    python3-io \
    python3-json \
    python3-logging \
    python3-misc \
    python3-mmap \
    python3-netclient \
    python3-netserver \
    python3-resource \
    python3-shell \
    python3-threading \
"

BBCLASSEXTEND = "native nativesdk"
