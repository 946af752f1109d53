/* blkbench: block I/O throughput of a device or file, the same program in a
 * tiny guest (on a yukumo Volume) and on the host (on a raw file), for
 * `make bench`'s storage part.
 *
 *   blkbench PATH MODE SPAN_MIB BLOCK_BYTES [TOTAL_MIB]
 *   MODE: seqwrite | seqread | randwrite | randread
 *
 * O_DIRECT, one request at a time; writes end with fdatasync (counted).
 * Random offsets are block-aligned within the first SPAN_MIB (xorshift,
 * fixed seed: both sides do the same requests). Prints
 *   MBPS <decimal MB/s> IOPS <requests per second> BYTES <moved>
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: blkbench PATH MODE SPAN_MIB BLOCK_BYTES [TOTAL_MIB]\n");
    return 2;
  }
  const char *path = argv[1], *mode = argv[2];
  long long span = atoll(argv[3]) << 20;
  long long bs = atoll(argv[4]);
  long long total = argc > 5 ? atoll(argv[5]) << 20 : span;
  int write = strstr(mode, "write") != NULL;
  int random = strncmp(mode, "rand", 4) == 0;
  if (bs <= 0 || span < bs || total < bs) {
    fprintf(stderr, "blkbench: bad sizes\n");
    return 2;
  }
  int fd = open(path, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
  if (fd < 0) {
    perror(path);
    return 1;
  }
  void *buf;
  if (posix_memalign(&buf, 4096, bs) != 0) return 1;
  memset(buf, 0xa5, bs);
  long long n = total / bs, blocks = span / bs;
  unsigned long long x = 88172645463325252ULL;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long long i = 0; i < n; i++) {
    long long blk = i % blocks;
    if (random) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      blk = (long long)(x % (unsigned long long)blocks);
    }
    ssize_t r = write ? pwrite(fd, buf, bs, blk * bs) : pread(fd, buf, bs, blk * bs);
    if (r != bs) {
      perror("blkbench: I/O");
      return 1;
    }
  }
  if (write && fdatasync(fd) != 0) {
    perror("fdatasync");
    return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
  printf("MBPS %.2f IOPS %.0f BYTES %lld\n", (double)(n * bs) / 1e6 / s, n / s, n * bs);
  return 0;
}
