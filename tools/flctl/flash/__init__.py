"""``flctl flash``: write a disk image to a card, eMMC, USB stick or image file and give the board its identity.

write.py        the procedure (check, copy, verify, grow, identity) and its command line
imagesource.py  the image to write: plain or compressed, its bmap and partition table
blockdev.py     the target: what it is, and whether it is safe to overwrite
gpt.py          GUID partition tables, read with struct; the headers invalidated while identity is written
ext4image.py    files in an ext4 at a byte offset of a disk or image (e2fsprogs, no mount)
"""
