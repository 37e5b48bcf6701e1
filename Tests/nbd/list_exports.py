"""Option haggling as libnbd does it: NBD_OPT_LIST, NBD_OPT_INFO per export,
NBD_OPT_LIST_META_CONTEXT, then NBD_OPT_GO to the default export.

Usage: list_exports.py SOCKET DESCRIPTION NAME=SIZE...

The first NAME is the default export.
"""
import sys

import nbd

from nbdtest import check, done

socket, description = sys.argv[1], sys.argv[2]
expected = [(a.split("=")[0], int(a.split("=")[1])) for a in sys.argv[3:]]

h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(f"nbd+unix:///?socket={socket}")
check(h.get_protocol() == "newstyle-fixed", f"fixed newstyle, got {h.get_protocol()}")
check(not h.get_tls_negotiated(), "no TLS")

names = []
h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
check(names == [(n, description) for n, _ in expected], f"NBD_OPT_LIST: {names}")
print(f"ok: list {names}", flush=True)

for name, size in expected:
    h.set_export_name(name)
    h.opt_info()
    check(h.get_size() == size, f"{name}: size {size}, got {h.get_size()}")
    check(h.get_canonical_export_name() == name, f"{name}: canonical name")
    check(h.get_export_description() == description, f"{name}: description")
    contexts = []
    h.opt_list_meta_context(lambda c: contexts.append(c) or 0)
    check(sorted(contexts) == ["base:allocation", "qemu:allocation-depth"], f"{name}: contexts {contexts}")
    print(f"ok: info {name}", flush=True)

# The empty name is the first export, and INFO_NAME gives its real name.
h.set_export_name("")
h.opt_info()
check(h.get_canonical_export_name() == expected[0][0], "default export's canonical name")
check(h.get_size() == expected[0][1], "default export's size")

# An unknown export is refused without ending the negotiation.
h.set_export_name("no-such-export")
try:
    h.opt_info()
    check(False, "INFO for an unknown export must fail")
except nbd.Error:
    pass

h.set_export_name("")
h.add_meta_context("base:allocation")
h.opt_go()
check(h.get_size() == expected[0][1], "GO to the default export")
check(h.can_meta_context("base:allocation"), "context selected for the default export")
check(len(h.pread(512, 0)) == 512, "reads after GO")
h.shutdown()

# NBD_OPT_ABORT ends a negotiation politely.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(f"nbd+unix:///?socket={socket}")
h.opt_abort()
check(h.aio_is_closed(), "closed after NBD_OPT_ABORT")
done()
