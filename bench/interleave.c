/* Interleaved start-up timing for bench/startup.sh --interleaved: each round runs every command
 * once, in a shuffled order, so that a machine whose load changes during the run slows them all
 * alike; no interpreter sits between the timer and fork/exec.
 *
 *   interleave ROUNDS NAME CMD ARGS... ';' NAME CMD ARGS... ';' ...
 *
 * Prints each command's median, mean and 25th percentile in ms over ROUNDS rounds (after 20
 * rounds of warm-up), and its median over the first command's. Output of the commands goes to
 * /dev/null; a command that fails stops the run. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CMDS 16

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ROUNDS NAME CMD ARGS... [';' NAME CMD ARGS...]...\n", argv[0]);
        return 2;
    }
    int rounds = atoi(argv[1]);
    if (rounds < 1) return 2;
    char *names[MAX_CMDS];
    char **cmds[MAX_CMDS];
    int n = 0;
    for (int i = 2; i < argc && n < MAX_CMDS; i++) {
        names[n] = argv[i];
        cmds[n++] = &argv[i + 1];
        while (i < argc && strcmp(argv[i], ";")) i++;
        if (i < argc) argv[i] = NULL;
    }
    double *t = calloc((size_t)n * rounds, sizeof *t);
    int order[MAX_CMDS];
    srand((unsigned)getpid());
    for (int r = -20; r < rounds; r++) {
        for (int i = 0; i < n; i++) order[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = rand() % (i + 1), x = order[i];
            order[i] = order[j];
            order[j] = x;
        }
        for (int k = 0; k < n; k++) {
            int c = order[k];
            double t0 = now_ms();
            pid_t pid = fork();
            if (pid == 0) {
                int null = open("/dev/null", O_WRONLY);
                dup2(null, 1);
                dup2(null, 2);
                execv(cmds[c][0], cmds[c]);
                _exit(127);
            }
            int st;
            if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) {
                fprintf(stderr, "%s failed\n", names[c]);
                return 1;
            }
            if (r >= 0) t[c * rounds + r] = now_ms() - t0;
        }
    }
    double first = 0;
    for (int c = 0; c < n; c++) {
        double *x = &t[c * rounds], sum = 0;
        for (int i = 0; i < rounds; i++) sum += x[i];
        qsort(x, rounds, sizeof *x, cmp);
        double med = x[rounds / 2];
        if (c == 0) first = med;
        printf("%-8s median %6.3f ms  mean %6.3f  p25 %6.3f  median/%s %.3f\n", names[c], med, sum / rounds,
               x[rounds / 4], names[0], med / first);
    }
    return 0;
}
