#!/usr/bin/env python3
"""Copies a 64-bit little-endian ELF shared object and sets DF_SYMBOLIC in its DT_FLAGS.

With DF_SYMBOLIC the dynamic linker resolves the object's own references to its own
definitions first (as if it had been linked with -Bsymbolic). megaserve needs this for
Debian/Ubuntu's libsentencepiece, which carries and exports a private protobuf 3.14: in a
process that also uses the system protobuf (gRPC), sentencepiece must keep binding to its
own copy. See server/CMakeLists.txt.

Usage: set_df_symbolic.py SOURCE DESTINATION
"""
import shutil
import struct
import sys

DT_NULL, DT_FLAGS, DF_SYMBOLIC, PT_DYNAMIC = 0, 30, 0x2, 2


def main() -> int:
    source, destination = sys.argv[1], sys.argv[2]
    data = bytearray(open(source, 'rb').read())
    if data[:4] != b'\x7fELF' or data[4] != 2 or data[5] != 1:
        sys.exit(f'{source}: not a 64-bit little-endian ELF file')
    phoff, = struct.unpack_from('<Q', data, 0x20)
    phentsize, phnum = struct.unpack_from('<HH', data, 0x36)
    for i in range(phnum):
        header = phoff + i * phentsize
        if struct.unpack_from('<I', data, header)[0] != PT_DYNAMIC:
            continue
        offset, = struct.unpack_from('<Q', data, header + 8)
        size, = struct.unpack_from('<Q', data, header + 32)
        entries = range(offset, offset + size - 15, 16)
        target = None
        for entry in entries:
            tag, value = struct.unpack_from('<qQ', data, entry)
            if tag == DT_FLAGS:
                target = (entry, value | DF_SYMBOLIC)
                break
            if tag == DT_NULL:
                # No DT_FLAGS: linkers leave spare DT_NULL slots after the terminator; use
                # this one if another DT_NULL follows to end the section.
                if entry + 16 < offset + size and \
                        struct.unpack_from('<q', data, entry + 16)[0] == DT_NULL:
                    target = (entry, DF_SYMBOLIC)
                break
        if target is None:
            sys.exit(f'{source}: no DT_FLAGS entry and no spare slot in the dynamic section')
        struct.pack_into('<qQ', data, target[0], DT_FLAGS, target[1])
        with open(destination + '.tmp', 'wb') as out:
            out.write(data)
        shutil.move(destination + '.tmp', destination)
        return 0
    sys.exit(f'{source}: no dynamic section')


if __name__ == '__main__':
    sys.exit(main())
