// vigil-kprobe: what a root user (or a rootkit) in the tenant does to hook a kernel function: a
// kprobe through perf_event_open(2), which makes the guest kernel write a breakpoint into the
// function's text. Vigil's write traps must refuse that write and report it; the tamper test runs
// this against the function Vigil hooks. Built static into the tenant initramfs by
// scripts/build-tenant-image.
//
// Usage: vigil-kprobe [SYMBOL]   (default security_socket_connect)
// Prints "vigil-kprobe: armed SYMBOL fd N" or "vigil-kprobe: SYMBOL: <error>"; exit 0 / 1.
#include <errno.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *symbol = argc > 1 ? argv[1] : "security_socket_connect";
    // The kprobe PMU's dynamic type number.
    FILE *type_file = fopen("/sys/bus/event_source/devices/kprobe/type", "r");
    int type = -1;
    if (!type_file || fscanf(type_file, "%d", &type) != 1) {
        printf("vigil-kprobe: %s: no kprobe PMU in /sys/bus/event_source (is sysfs mounted?)\n",
               symbol);
        return 1;
    }
    fclose(type_file);

    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = (uint32_t)type;
    attr.config1 = (uint64_t)(uintptr_t)symbol; // kprobe_func
    attr.config2 = 0;                           // probe_offset
    attr.sample_period = 1;
    // Any process, CPU 0: system-wide, as a rootkit would.
    fflush(stdout);
    long fd = syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0);
    if (fd < 0) {
        printf("vigil-kprobe: %s: %s\n", symbol, strerror(errno));
        return 1;
    }
    printf("vigil-kprobe: armed %s fd %ld\n", symbol, fd);
    return 0;
}
