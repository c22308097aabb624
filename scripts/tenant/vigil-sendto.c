// vigil-sendto: one UDP datagram to a destination named in the call (sendto on an unconnected
// socket), the path Vigil's sendmsg hook decides by the tenant's connect rules.
// Usage: vigil-sendto ADDR PORT MESSAGE   Prints "sent N" or "sendto: <error>"; exit 0 / 1.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: vigil-sendto ADDR PORT MESSAGE\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
        fprintf(stderr, "vigil-sendto: bad address %s\n", argv[1]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        printf("socket: %s\n", strerror(errno));
        return 1;
    }
    ssize_t n = sendto(fd, argv[3], strlen(argv[3]), 0, (struct sockaddr *)&to, sizeof to);
    if (n < 0) {
        printf("sendto: %s\n", strerror(errno));
        return 1;
    }
    printf("sent %zd\n", n);
    return 0;
}
