################################################################################
#
# onnxruntime
#
################################################################################

# 1.25.0: the newest release whose source hash could be taken from a
# published recipe (see onnxruntime.hash); it has upstream wheels for
# Python 3.14, the version Buildroot 2026.02 ships. The agent needs >= 1.18.
ONNXRUNTIME_VERSION = 1.25.0
ONNXRUNTIME_SITE = $(call github,microsoft,onnxruntime,v$(ONNXRUNTIME_VERSION))
ONNXRUNTIME_LICENSE = MIT
ONNXRUNTIME_LICENSE_FILES = LICENSE ThirdPartyNotices.txt
ONNXRUNTIME_CPE_ID_VENDOR = microsoft
ONNXRUNTIME_SUBDIR = cmake
ONNXRUNTIME_SUPPORTS_IN_SOURCE_BUILD = NO
ONNXRUNTIME_INSTALL_STAGING = YES
ONNXRUNTIME_DEPENDENCIES = \
	host-python3 \
	host-python-installer \
	host-python-setuptools \
	python3 \
	python-numpy

# The third-party sources cmake/deps.txt pins are downloaded with the
# source archive (onnxruntime-deps.sh), so the build itself needs no
# network. Skipped: what a CPU-only Linux build with the unit tests off
# never fetches (other platforms' protoc, GPU and NPU providers, tests).
ONNXRUNTIME_DEPS_DIR = $(ONNXRUNTIME_DL_DIR)/deps-$(ONNXRUNTIME_VERSION)
ONNXRUNTIME_DEPS_SKIP = \
	composable_kernel coremltools cudnn_frontend cutlass dawn \
	directx_headers extensions google_benchmark googletest \
	microsoft_wil onnx_tensorrt protoc_linux_x86 protoc_mac_universal \
	protoc_win32 protoc_win64 tensorboard

define ONNXRUNTIME_FETCH_DEPS
	ONNXRUNTIME_DEPS_SKIP="$(ONNXRUNTIME_DEPS_SKIP)" \
		WGET="$(call qstrip,$(BR2_WGET))" \
		$(ONNXRUNTIME_PKGDIR)/onnxruntime-deps.sh fetch \
		$(ONNXRUNTIME_DL_DIR)/$(ONNXRUNTIME_SOURCE) \
		onnxruntime-$(ONNXRUNTIME_VERSION) $(ONNXRUNTIME_DEPS_DIR)
endef
ONNXRUNTIME_POST_DOWNLOAD_HOOKS += ONNXRUNTIME_FETCH_DEPS

define ONNXRUNTIME_USE_FETCHED_DEPS
	$(ONNXRUNTIME_PKGDIR)/onnxruntime-deps.sh localize \
		$(@D)/cmake/deps.txt $(ONNXRUNTIME_DEPS_DIR)
endef
ONNXRUNTIME_PRE_CONFIGURE_HOOKS += ONNXRUNTIME_USE_FETCHED_DEPS

# When cross-compiling, onnxruntime runs the protoc release binary that
# deps.txt pins for the build machine (protoc_linux_x64 or
# protoc_linux_aarch64): Buildroot's host-protobuf is a newer major
# version than the libprotobuf onnxruntime compiles in.
ONNXRUNTIME_CONF_OPTS = \
	-Donnxruntime_BUILD_SHARED_LIB=ON \
	-Donnxruntime_ENABLE_PYTHON=ON \
	-Donnxruntime_BUILD_UNIT_TESTS=OFF \
	-Donnxruntime_BUILD_BENCHMARKS=OFF \
	-Donnxruntime_RUN_ONNX_TESTS=OFF \
	-Donnxruntime_ENABLE_TRAINING=OFF \
	-Donnxruntime_ENABLE_LTO=OFF \
	-Donnxruntime_USE_MIMALLOC=OFF \
	-Donnxruntime_USE_TELEMETRY=OFF \
	-DFETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER \
	-DPython_EXECUTABLE=$(HOST_DIR)/bin/python3 \
	-DPython_INCLUDE_DIR=$(STAGING_DIR)/usr/include/python$(PYTHON3_VERSION_MAJOR) \
	-DPython_NumPy_INCLUDE_DIR=$(STAGING_DIR)/usr/lib/python$(PYTHON3_VERSION_MAJOR)/site-packages/numpy/_core/include

# The Python package: setup.py packs what the cmake build assembled in the
# build directory into a wheel, as onnxruntime's tools/ci_build/build.py
# does, and the wheel is installed like any python-package's.
define ONNXRUNTIME_BUILD_WHEEL
	cd $(ONNXRUNTIME_BUILDDIR) && \
		$(PKG_PYTHON_SETUPTOOLS_ENV) $(HOST_DIR)/bin/python3 \
		$(@D)/setup.py bdist_wheel
endef
ONNXRUNTIME_POST_BUILD_HOOKS += ONNXRUNTIME_BUILD_WHEEL

# The target gets the Python package only (its capi/ holds the runtime
# libraries); the C/C++ headers and libonnxruntime.so go to staging.
define ONNXRUNTIME_INSTALL_TARGET_CMDS
	cd $(ONNXRUNTIME_BUILDDIR) && \
		$(PKG_PYTHON_SETUPTOOLS_ENV) $(HOST_DIR)/bin/python3 \
		$(PKG_PYTHON_SETUPTOOLS_INSTALL_TARGET_CMD)
endef

$(eval $(cmake-package))
