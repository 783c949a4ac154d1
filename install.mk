# install.mk - the shared library and `make install` / `make uninstall` (included by the Makefile).
#   make install [PREFIX=/usr/local] [DESTDIR=]   forge, libforge.a, libforge.so (SONAME
#       libforge.so.0), the public headers, libforge_cuda.so when built (make gpu), the demo model
#       and PREFIX/lib/pkgconfig/forge.pc
#   make uninstall [PREFIX=...] [DESTDIR=]       removes exactly those files
# The installed forge finds libforge_cuda.so in PREFIX/lib through its RUNPATH ($ORIGIN/../lib)
# and the demo model in PREFIX/share/forge/ (relative to the executable, so DESTDIR staging works).

PREFIX    ?= /usr/local
DESTDIR   ?=
VERSION   := $(shell sed -n 's/^\#define FORGE_VERSION_STRING "\(.*\)"/\1/p' include/forge.h)
SOVERSION := $(firstword $(subst ., ,$(VERSION)))
SONAME    := libforge.so.$(SOVERSION)
SHLIB     := $(BUILD)/libforge.so.$(VERSION)
PUB_HDR   := $(wildcard include/forge*.h)
# libcurl and libmicrohttpd go in Libs.private rather than Requires.private: `pkg-config --static`
# would otherwise ask for their own static dependencies (nghttp2, ssh2, ldap, gnutls, unistring,
# ...), which Debian's -dev packages do not install; a static libforge links the shared ones.
PC_REQUIRES := $(filter-out libcurl libmicrohttpd,$(PKGS))

all: $(SHLIB)

$(SHLIB): $(LIB_OBJ)
	$(CC) -shared -Wl,-soname,$(SONAME) $(LDFLAGS) -o $@ $^ $(LDLIBS)

D := $(DESTDIR)$(PREFIX)

.PHONY: install uninstall
install: $(FORGE) $(LIB) $(SHLIB)
	install -d $(D)/bin $(D)/lib/pkgconfig $(D)/include $(D)/share/forge
	install -m 755 $(FORGE) $(D)/bin/forge
	install -m 644 $(LIB) $(D)/lib/libforge.a
	install -m 755 $(SHLIB) $(D)/lib/libforge.so.$(VERSION)
	ln -sf libforge.so.$(VERSION) $(D)/lib/$(SONAME)
	ln -sf $(SONAME) $(D)/lib/libforge.so
	install -m 644 $(PUB_HDR) $(D)/include/
	install -m 644 models/stories260K.gguf $(D)/share/forge/stories260K.gguf
	install -m 644 models/README.md $(D)/share/forge/README.md
	if [ -f "$(GPU_LIB)" ]; then install -m 755 "$(GPU_LIB)" $(D)/lib/libforge_cuda.so; fi
	printf '%s\n' 'prefix=$(PREFIX)' 'exec_prefix=$${prefix}' 'libdir=$${exec_prefix}/lib' \
	    'includedir=$${prefix}/include' '' 'Name: forge' \
	    'Description: LLM inference engine for GGUF models (CPU; CUDA through libforge_cuda.so)' \
	    'Version: $(VERSION)' 'Requires.private: $(PC_REQUIRES)' \
	    'Libs: -L$${libdir} -lforge' 'Libs.private: -lcurl -lm -lpthread -ldl -lmicrohttpd' \
	    'Cflags: -I$${includedir}' >$(D)/lib/pkgconfig/forge.pc

uninstall:
	rm -f $(D)/bin/forge $(D)/lib/libforge.a $(D)/lib/libforge.so.$(VERSION) $(D)/lib/$(SONAME) \
	    $(D)/lib/libforge.so $(D)/lib/libforge_cuda.so $(D)/lib/pkgconfig/forge.pc \
	    $(addprefix $(D)/include/,$(notdir $(PUB_HDR))) \
	    $(D)/share/forge/stories260K.gguf $(D)/share/forge/README.md
	-rmdir $(D)/share/forge 2>/dev/null
