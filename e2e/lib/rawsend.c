/*
 * rawsend: send one Ethernet frame, given in hex, COUNT times (1 s apart)
 * on an interface, as it is: no address, tag or checksum is touched. Part of
 * yukumo's tiny test guest (e2e/lib/tiny-guest.sh links it statically), so a
 * test can make a guest send what a hostile tenant would (an IPv6 router
 * advertisement, a forged frame) and prove that it does not get through.
 *
 *   rawsend IFNAME HEXFRAME [COUNT]
 */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: rawsend IFNAME HEXFRAME [COUNT]\n");
        return 2;
    }
    size_t n = strlen(argv[2]);
    if (n % 2 != 0 || n / 2 < 14 || n / 2 > 9216) {
        fprintf(stderr, "rawsend: the frame must be 14 to 9216 bytes of hex\n");
        return 2;
    }
    unsigned char frame[9216];
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(argv[2][2 * i]), lo = hexval(argv[2][2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "rawsend: not hex at offset %zu\n", 2 * i);
            return 2;
        }
        frame[i] = (unsigned char)(hi << 4 | lo);
    }
    int count = argc > 3 ? atoi(argv[3]) : 1;
    if (count < 1 || count > 100) count = 1;
    unsigned int ifindex = if_nametoindex(argv[1]);
    if (ifindex == 0) {
        perror("rawsend: interface");
        return 1;
    }
    int s = socket(AF_PACKET, SOCK_RAW, 0);
    if (s < 0) {
        perror("rawsend: socket");
        return 1;
    }
    struct sockaddr_ll to;
    memset(&to, 0, sizeof to);
    to.sll_family = AF_PACKET;
    to.sll_ifindex = (int)ifindex;
    to.sll_halen = 6;
    memcpy(to.sll_addr, frame, 6);
    for (int i = 0; i < count; i++) {
        if (i > 0) sleep(1);
        if (sendto(s, frame, n / 2, 0, (struct sockaddr *)&to, sizeof to) < 0) {
            perror("rawsend: sendto");
            return 1;
        }
    }
    printf("rawsend: %d frame(s) of %zu bytes sent on %s\n", count, n / 2, argv[1]);
    close(s);
    return 0;
}
