/* Runs a fuzz target over files, for builds without libFuzzer: each
 * argument is a file or a directory of files (the committed seed corpus),
 * each file one input. ctest runs every target this way under the
 * sanitizers, so the corpus stays a regression test; `make fuzz` builds the
 * same targets with clang's libFuzzer to search for new inputs. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Inputs past this are not seeds: refuse rather than read a large file. */
#define INPUT_MAX (1024 * 1024)

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  uint8_t *buf;
  long n;

  if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 ||
      n > INPUT_MAX || fseek(f, 0, SEEK_SET) != 0) {
    fprintf(stderr, "replay: cannot read %s\n", path);
    if (f != NULL)
      fclose(f);
    return -1;
  }
  /* exactly the input's size, so a read past its end is caught */
  buf = malloc(n > 0 ? (size_t)n : 1);
  if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "replay: cannot read %s\n", path);
    free(buf);
    fclose(f);
    return -1;
  }
  fclose(f);
  LLVMFuzzerTestOneInput(buf, (size_t)n);
  free(buf);
  return 0;
}

int main(int argc, char **argv) {
  int files = 0;

  for (int i = 1; i < argc; i++) {
    struct stat st;
    DIR *d;
    struct dirent *e;

    if (stat(argv[i], &st) != 0) {
      fprintf(stderr, "replay: %s: no such file or directory\n", argv[i]);
      return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
      if (run_file(argv[i]) != 0)
        return 1;
      files++;
      continue;
    }
    if ((d = opendir(argv[i])) == NULL)
      return 1;
    while ((e = readdir(d)) != NULL) {
      char path[4096];
      if (e->d_name[0] == '.')
        continue;
      snprintf(path, sizeof(path), "%s/%s", argv[i], e->d_name);
      if (run_file(path) != 0) {
        closedir(d);
        return 1;
      }
      files++;
    }
    closedir(d);
  }
  if (files == 0) {
    fprintf(stderr, "replay: no inputs\n");
    return 1;
  }
  printf("replay: %d inputs, no failure\n", files);
  return 0;
}
