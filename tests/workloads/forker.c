// A fast forker for the tier tests: Python forks too slowly to reach 1,000/s on a busy host.
// Usage: forker COUNT SECONDS. Forks a child that exits at once, waits for it, until COUNT forks
// or SECONDS pass, whichever first. Run inside a pids-limited cgroup.
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
#include <time.h>
int main(int argc, char **argv) {
    long count = atol(argv[1]); double secs = atof(argv[2]);
    struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
    long n = 0;
    while (n < count) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > secs) break;
        pid_t p = fork();
        if (p == 0) _exit(0);
        if (p > 0) { waitpid(p, 0, 0); n++; } else usleep(1000);
    }
    return 0;
}
