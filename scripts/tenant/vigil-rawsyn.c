// vigil-rawsyn: sends one hand-made TCP SYN as a raw Ethernet frame (AF_PACKET) out of an
// interface: traffic no connect() stands behind, so no verdict opens it. The switch-tier firewall
// must drop it. Usage: vigil-rawsyn IFNAME SRC_IP DST_IP DST_PORT
// Prints "sent N" or "<call>: <error>"; exit 0 / 1.
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static unsigned short checksum(const unsigned char *p, int len) {
    unsigned long sum = 0;
    for (int i = 0; i + 1 < len; i += 2) sum += (p[i] << 8) | p[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (unsigned short)~sum;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: vigil-rawsyn IFNAME SRC_IP DST_IP DST_PORT\n");
        return 2;
    }
    unsigned char f[54];
    memset(f, 0, sizeof f);
    memset(f, 0xff, 6);                                     // to everyone
    memcpy(f + 6, "\x52\x54\x00\x12\x34\x56", 6);           // from the tenant's NIC
    f[12] = 0x08;                                           // IPv4
    unsigned char *ip = f + 14, *tcp = f + 34;
    ip[0] = 0x45;
    ip[3] = 40;                                             // total length
    ip[8] = 64;                                             // TTL
    ip[9] = 6;                                              // TCP
    inet_pton(AF_INET, argv[2], ip + 12);
    inet_pton(AF_INET, argv[3], ip + 16);
    unsigned short csum = checksum(ip, 20);
    ip[10] = csum >> 8;
    ip[11] = csum & 0xff;
    tcp[0] = 0x9c; tcp[1] = 0x40;                           // source port 40000
    unsigned short port = (unsigned short)atoi(argv[4]);
    tcp[2] = port >> 8; tcp[3] = port & 0xff;
    tcp[7] = 1;                                             // sequence number
    tcp[12] = 5 << 4;                                       // header length
    tcp[13] = 0x02;                                         // SYN
    tcp[14] = 0xff; tcp[15] = 0xff;                         // window
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) {
        printf("socket: %s\n", strerror(errno));
        return 1;
    }
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(argv[1]),
                             .sll_halen = 6};
    memset(to.sll_addr, 0xff, 6);
    ssize_t n = sendto(fd, f, sizeof f, 0, (struct sockaddr *)&to, sizeof to);
    if (n < 0) {
        printf("sendto: %s\n", strerror(errno));
        return 1;
    }
    printf("sent %zd\n", n);
    return 0;
}
