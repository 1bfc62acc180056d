"""The shared receivers of dispy.py, as units: ``FileReceiver`` (path checks, mode mask,
size limit, chunk order, no partial copies, the liveness rule)."""

import os
import shutil
import stat
import tempfile
import unittest

import dispy


class FileReceiverTest(unittest.TestCase):

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix='dispytest-receiver-')
        self.addCleanup(shutil.rmtree, self.folder, True)

    def receiver(self, **rules):
        receiver = dispy.FileReceiver(self.folder, **rules)
        self.addCleanup(receiver.close)
        return receiver

    def listing(self):
        return sorted(os.path.relpath(os.path.join(d, f), self.folder)
                      for d, _, files in os.walk(self.folder) for f in files)

    def test_chunks_in_order_make_one_file_at_its_path_when_complete(self):
        receiver = self.receiver(max_size=100)
        self.assertIsNone(receiver.chunk('a.dat', 0o644, 0, b'x' * 40, False))
        self.assertNotIn('a.dat', self.listing(), 'a partial file is at the final path')
        self.assertEqual(len(receiver), 1)
        path = receiver.chunk('a.dat', 0o644, 40, b'y' * 10, True)
        self.assertEqual(path, os.path.join(self.folder, 'a.dat'))
        self.assertEqual(self.listing(), ['a.dat'])
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'x' * 40 + b'y' * 10)
        self.assertEqual(len(receiver), 0)

    def test_mode_mask(self):
        receiver = self.receiver()
        for name, mode, want in (('s', 0o6755, 0o755), ('t', 0o1777, 0o755),
                                 ('r', 0o444, 0o644), ('n', 0, 0o600)):
            path = receiver.whole(name, mode, b'#!/bin/sh\n')
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), want, name)
        with self.assertRaises(dispy.FileRefused):
            receiver.whole('m', 'rwx', b'')

    def test_refused_chunks_leave_nothing(self):
        """Out of order (a gap, a repeat, a negative or claimed offset), over the size
        limit, malformed: the whole file is dropped, temporary copy included."""
        cases = [[(0, b'a' * 10), (20, b'b')], [(0, b'a' * 10), (0, b'a' * 10)],
                 [(0, b'a' * 10), (-10, b'a')], [(5, b'a')], [(0, b'a' * 60), (60, b'b' * 60)],
                 [(0, b'a'), (1, 'text')], [(True, b'a')]]
        for chunks in cases:
            receiver = self.receiver(max_size=100)
            with self.assertRaises(dispy.FileRefused, msg=chunks):
                for offset, data in chunks:
                    receiver.chunk('f', 0o644, offset, data, False)
            self.assertEqual(self.listing(), [], chunks)
            self.assertEqual(len(receiver), 0)

    def test_size_limit_text(self):
        with self.assertRaisesRegex(dispy.FileRefused, 'max_file_size'):
            self.receiver(max_size=10).whole('big', 0o644, b'x' * 11)

    def test_plain_names_only(self):
        receiver = self.receiver()
        for name in ('', '.', '..', '../x', 'a/b', '/abs', 'a\\b', 'x\0y', None, ['a'], 3):
            with self.assertRaisesRegex(dispy.PathRefused, 'plain base names', msg=name):
                receiver.chunk(name, 0o644, 0, b'x', True)
        self.assertEqual(self.listing(), [])

    def test_relative_paths_stay_in_the_folder(self):
        receiver = self.receiver(paths='relative')
        self.assertEqual(receiver.whole('out/a.txt', 0o644, b'a'),
                         os.path.join(self.folder, 'out', 'a.txt'))
        self.assertEqual(receiver.whole('/abs/b.txt', 0o644, b'b'),
                         os.path.join(self.folder, 'abs', 'b.txt'))
        for name in ('', '.', '..', '../x', 'a/../../x', 'x\0y', None):
            with self.assertRaises(dispy.PathRefused, msg=name):
                receiver.whole(name, 0o644, b'x')
        self.assertEqual(self.listing(), ['abs/b.txt', 'out/a.txt'])

    def test_senders_of_one_name_do_not_mix(self):
        receiver = self.receiver()
        receiver.chunk('same', 0o644, 0, b'1' * 5, False, source='job1')
        receiver.chunk('same', 0o644, 0, b'2' * 5, False, source='job2')
        receiver.chunk('same', 0o644, 5, b'2', True, source='job2')
        path = receiver.chunk('same', 0o644, 5, b'1', True, source='job1')
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'111111')

    def test_a_stalled_file_is_dropped_by_expire_and_by_the_next_chunk(self):
        receiver = self.receiver(stall_timeout=10)
        receiver.chunk('slow', 0o644, 0, b'x', False, now=100.0)
        receiver.chunk('other', 0o644, 0, b'y', False, now=105.0)
        self.assertEqual(receiver.expire(now=109.0), [])
        self.assertEqual(receiver.expire(now=111.0), ['slow'])
        self.assertEqual(len(receiver), 1)
        # a chunk arriving late finds its file gone: refused, not appended to nothing
        receiver.chunk('late', 0o644, 0, b'z', False, now=112.0)
        with self.assertRaisesRegex(dispy.FileRefused, 'out of order'):
            receiver.chunk('late', 0o644, 1, b'z', True, now=123.0)
        self.assertEqual(len(receiver), 0, 'the next chunk expires the others too')
        self.assertEqual(self.listing(), [])

    def test_close_drops_every_partial_file(self):
        receiver = self.receiver()
        receiver.chunk('a', 0o644, 0, b'x', False)
        receiver.whole('done', 0o644, b'kept')
        receiver.close()
        self.assertEqual(self.listing(), ['done'])

    def test_a_file_that_cannot_be_renamed_leaves_nothing(self):
        os.mkdir(os.path.join(self.folder, 'dir'))
        with self.assertRaises(OSError):
            self.receiver().whole('dir', 0o644, b'x')
        self.assertEqual(self.listing(), [])


if __name__ == '__main__':
    unittest.main()
