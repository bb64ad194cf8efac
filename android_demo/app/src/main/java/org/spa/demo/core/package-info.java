/**
 * The app's logic that needs no Android API: what the activities decide, kept here so that the
 * host JVM's JUnit tests (android_demo/app/src/test, run by scripts/host_test.sh) can check it.
 * Nothing in this package may import android.* (host_test.sh compiles it without android.jar).
 */
package org.spa.demo.core;
